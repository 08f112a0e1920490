-- Tether schema, version 1 (SQLite). Times are epoch seconds; JSON is stored as TEXT.
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    workflow_id TEXT NOT NULL,
    workflow_type TEXT NOT NULL,
    task_queue TEXT NOT NULL,
    status TEXT NOT NULL,
    request_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    closed_at REAL,
    result TEXT,
    failure TEXT,
    next_seq INTEGER NOT NULL,
    inbound_seq INTEGER NOT NULL,
    task_version INTEGER NOT NULL DEFAULT 0,
    task_failure TEXT,
    parent_run_id TEXT,
    parent_seq INTEGER,
    parent_close_policy TEXT,
    memo TEXT,
    search_attributes TEXT,
    execution_deadline REAL,
    run_timeout REAL,
    next_run_id TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_parent ON runs(parent_run_id);
CREATE UNIQUE INDEX IF NOT EXISTS runs_open_workflow_id
    ON runs(namespace, workflow_id) WHERE status = 'running';
CREATE INDEX IF NOT EXISTS runs_by_workflow_id ON runs(namespace, workflow_id, created_at);
CREATE INDEX IF NOT EXISTS runs_by_created ON runs(namespace, created_at);
CREATE TABLE IF NOT EXISTS history (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    time REAL NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS workflow_tasks (
    run_id TEXT PRIMARY KEY,
    task_queue TEXT NOT NULL,
    visible_at REAL NOT NULL,
    owner TEXT,
    token TEXT,
    attempt INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS workflow_tasks_ready ON workflow_tasks(task_queue, visible_at);
CREATE TABLE IF NOT EXISTS activity_tasks (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    task_queue TEXT NOT NULL,
    activity_type TEXT NOT NULL,
    args TEXT NOT NULL,
    options TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    scheduled_at REAL NOT NULL,
    visible_at REAL NOT NULL,
    owner TEXT,
    token TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    heartbeat_details TEXT,
    last_failure TEXT,
    PRIMARY KEY (run_id, seq)
);
CREATE INDEX IF NOT EXISTS activity_tasks_ready ON activity_tasks(task_queue, visible_at);
CREATE INDEX IF NOT EXISTS activity_tasks_leases ON activity_tasks(owner, visible_at);
CREATE TABLE IF NOT EXISTS timers (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    fire_at REAL NOT NULL,
    PRIMARY KEY (run_id, seq)
);
CREATE INDEX IF NOT EXISTS timers_due ON timers(fire_at);
CREATE TABLE IF NOT EXISTS queries (
    query_id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    task_queue TEXT NOT NULL,
    name TEXT NOT NULL,
    args TEXT NOT NULL,
    created_at REAL NOT NULL,
    visible_at REAL NOT NULL,
    owner TEXT,
    token TEXT,
    answered INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    failure TEXT
);
CREATE INDEX IF NOT EXISTS queries_ready ON queries(task_queue, answered, visible_at);
CREATE TABLE IF NOT EXISTS updates (
    run_id TEXT NOT NULL,
    update_id TEXT NOT NULL,
    name TEXT NOT NULL,
    args TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    result TEXT,
    failure TEXT,
    PRIMARY KEY (run_id, update_id)
);
CREATE INDEX IF NOT EXISTS updates_pending ON updates(run_id, state);
CREATE TABLE IF NOT EXISTS workers (
    task_queue TEXT NOT NULL,
    identity TEXT NOT NULL,
    workflow_types TEXT NOT NULL,
    activity_types TEXT NOT NULL,
    last_seen REAL NOT NULL,
    PRIMARY KEY (task_queue, identity)
);
