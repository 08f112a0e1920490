-- Claims in one round trip: each function leases ready tasks and reads them back.
-- In a VOLATILE PL/pgSQL function every statement takes a fresh snapshot, so the
-- read-back sees a run as it is after the lease (as a second statement from the
-- client would), not as it was when the call began. The columns returned are those
-- of CLAIMED_TASK and ACTIVITY_COLUMNS (src/tether/_store/sql_core.py): a change to
-- either needs a new migration that replaces its function.

CREATE OR REPLACE FUNCTION tether_claim_workflow_tasks(
    p_owner TEXT, p_token TEXT, p_lease_until DOUBLE PRECISION, p_task_queue TEXT,
    p_now DOUBLE PRECISION, p_limit BIGINT, p_history_below BIGINT
) RETURNS TABLE (
    o_run_id TEXT, o_workflow_id TEXT, o_workflow_type TEXT, o_namespace TEXT,
    o_attempt BIGINT, o_task_version BIGINT, o_next_seq BIGINT, o_has_updates BOOLEAN,
    o_seq BIGINT, o_type TEXT, o_time DOUBLE PRECISION, o_data TEXT
) LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    UPDATE workflow_tasks SET owner = p_owner, token = p_token, visible_at = p_lease_until,
        attempt = workflow_tasks.attempt + 1
    WHERE workflow_tasks.run_id IN (
        SELECT x.run_id FROM workflow_tasks x
        WHERE x.task_queue = p_task_queue AND x.visible_at <= p_now
        ORDER BY x.visible_at LIMIT p_limit FOR UPDATE OF x SKIP LOCKED);
    IF NOT FOUND THEN
        RETURN;
    END IF;
    RETURN QUERY
    SELECT t.run_id, r.workflow_id, r.workflow_type, r.namespace, t.attempt, r.task_version,
        r.next_seq, EXISTS (SELECT 1 FROM updates u WHERE u.run_id = t.run_id
        AND u.state = 'requested'), h.seq, h.type, h.time, h.data
    FROM workflow_tasks t JOIN runs r ON r.run_id = t.run_id
    LEFT JOIN history h ON h.run_id = t.run_id AND r.next_seq <= p_history_below
    WHERE t.task_queue = p_task_queue AND t.visible_at = p_lease_until AND t.token = p_token
    ORDER BY r.created_at, t.run_id, h.seq;
END
$$;

CREATE OR REPLACE FUNCTION tether_claim_activity_tasks(
    p_owner TEXT, p_token TEXT, p_lease_until DOUBLE PRECISION, p_task_queue TEXT,
    p_now DOUBLE PRECISION, p_limit BIGINT
) RETURNS TABLE (
    o_run_id TEXT, o_workflow_id TEXT, o_workflow_type TEXT, o_seq BIGINT,
    o_activity_type TEXT, o_task_queue TEXT, o_args TEXT, o_options TEXT, o_attempt BIGINT,
    o_scheduled_at DOUBLE PRECISION, o_heartbeat_details TEXT, o_token TEXT, o_owner TEXT,
    o_cancel_requested BIGINT
) LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    UPDATE activity_tasks SET owner = p_owner, token = p_token, visible_at = p_lease_until,
        attempt = activity_tasks.attempt + 1
    WHERE (activity_tasks.run_id, activity_tasks.seq) IN (
        SELECT x.run_id, x.seq FROM activity_tasks x
        WHERE x.task_queue = p_task_queue AND x.visible_at <= p_now AND x.owner IS NULL
        ORDER BY x.visible_at LIMIT p_limit FOR UPDATE OF x SKIP LOCKED);
    IF NOT FOUND THEN
        RETURN;
    END IF;
    RETURN QUERY
    SELECT a.run_id, r.workflow_id, r.workflow_type, a.seq, a.activity_type, a.task_queue,
        a.args, a.options, a.attempt, a.scheduled_at, a.heartbeat_details, a.token, a.owner,
        a.cancel_requested
    FROM activity_tasks a JOIN runs r ON r.run_id = a.run_id
    WHERE a.task_queue = p_task_queue AND a.visible_at = p_lease_until AND a.token = p_token
    ORDER BY a.scheduled_at;
END
$$;
