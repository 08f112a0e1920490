-- Tether schema, version 1 (PostgreSQL). Same tables, columns and indexes as the
-- SQLite schema: REAL -> DOUBLE PRECISION, INTEGER -> BIGINT, TEXT stays TEXT.
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    workflow_id TEXT NOT NULL,
    workflow_type TEXT NOT NULL,
    task_queue TEXT NOT NULL,
    status TEXT NOT NULL,
    request_id TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    closed_at DOUBLE PRECISION,
    result TEXT,
    failure TEXT,
    next_seq BIGINT NOT NULL,
    inbound_seq BIGINT NOT NULL,
    task_version BIGINT NOT NULL DEFAULT 0,
    task_failure TEXT,
    parent_run_id TEXT,
    parent_seq BIGINT,
    parent_close_policy TEXT,
    memo TEXT,
    search_attributes TEXT,
    execution_deadline DOUBLE PRECISION,
    run_timeout DOUBLE PRECISION,
    next_run_id TEXT
);
CREATE INDEX runs_by_parent ON runs(parent_run_id);
CREATE UNIQUE INDEX runs_open_workflow_id
    ON runs(namespace, workflow_id) WHERE status = 'running';
CREATE INDEX runs_by_workflow_id ON runs(namespace, workflow_id, created_at);
CREATE INDEX runs_by_created ON runs(namespace, created_at);
CREATE TABLE history (
    run_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    type TEXT NOT NULL,
    time DOUBLE PRECISION NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);
CREATE TABLE workflow_tasks (
    run_id TEXT PRIMARY KEY,
    task_queue TEXT NOT NULL,
    visible_at DOUBLE PRECISION NOT NULL,
    owner TEXT,
    token TEXT,
    attempt BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX workflow_tasks_ready ON workflow_tasks(task_queue, visible_at);
CREATE TABLE activity_tasks (
    run_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    task_queue TEXT NOT NULL,
    activity_type TEXT NOT NULL,
    args TEXT NOT NULL,
    options TEXT NOT NULL,
    attempt BIGINT NOT NULL DEFAULT 0,
    scheduled_at DOUBLE PRECISION NOT NULL,
    visible_at DOUBLE PRECISION NOT NULL,
    owner TEXT,
    token TEXT,
    cancel_requested BIGINT NOT NULL DEFAULT 0,
    heartbeat_details TEXT,
    last_failure TEXT,
    PRIMARY KEY (run_id, seq)
);
CREATE INDEX activity_tasks_ready ON activity_tasks(task_queue, visible_at);
CREATE INDEX activity_tasks_leases ON activity_tasks(owner, visible_at);
CREATE TABLE timers (
    run_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    fire_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (run_id, seq)
);
CREATE INDEX timers_due ON timers(fire_at);
CREATE TABLE queries (
    query_id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    task_queue TEXT NOT NULL,
    name TEXT NOT NULL,
    args TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    visible_at DOUBLE PRECISION NOT NULL,
    owner TEXT,
    token TEXT,
    answered BIGINT NOT NULL DEFAULT 0,
    result TEXT,
    failure TEXT
);
CREATE INDEX queries_ready ON queries(task_queue, answered, visible_at);
CREATE TABLE updates (
    run_id TEXT NOT NULL,
    update_id TEXT NOT NULL,
    name TEXT NOT NULL,
    args TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    result TEXT,
    failure TEXT,
    PRIMARY KEY (run_id, update_id)
);
CREATE INDEX updates_pending ON updates(run_id, state);
CREATE TABLE workers (
    task_queue TEXT NOT NULL,
    identity TEXT NOT NULL,
    workflow_types TEXT NOT NULL,
    activity_types TEXT NOT NULL,
    last_seen DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (task_queue, identity)
);
