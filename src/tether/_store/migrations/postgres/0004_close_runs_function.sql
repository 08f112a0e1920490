-- Closing workflow tasks in one round trip: the completions of many runs whose last
-- workflow task closes them with nothing else to write (the workflow returned or
-- failed), as a group shares a transaction. For each run, in order, it does what the
-- lone closing statement does (SqlWorkflowTasks._complete_workflow_task): close the
-- run if the lease token and task version still hold and it has no parent or running
-- child to tell, append its events, and drop its pending work (task rows, activities,
-- timers) and answer its open updates. Every statement is by primary key, so no plan
-- depends on the tables' statistics. Returns (index in the arrays, new next_seq, new
-- task_version) of each run it closed; the caller runs the others alone.
-- Each statement takes a fresh snapshot (VOLATILE): the cleanup sees what committed
-- while the close waited for the run's row.

CREATE OR REPLACE FUNCTION tether_close_runs(
    p_run_ids TEXT[], p_task_versions BIGINT[], p_tokens TEXT[], p_statuses TEXT[],
    p_results TEXT[], p_failures TEXT[], p_times DOUBLE PRECISION[], p_rejections TEXT[],
    p_event_counts BIGINT[], p_event_types TEXT[], p_event_data TEXT[]
) RETURNS TABLE (o_index INT, o_next_seq BIGINT, o_task_version BIGINT)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    i INT;
    done_events INT := 0;
    new_next_seq BIGINT;
    new_version BIGINT;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_run_ids, 1), 0) LOOP
        UPDATE runs r SET task_version = r.task_version + 1, task_failure = NULL,
            next_seq = r.next_seq + p_event_counts[i], status = p_statuses[i],
            result = p_results[i], failure = p_failures[i], closed_at = p_times[i],
            next_run_id = NULL
        WHERE r.run_id = p_run_ids[i] AND r.task_version = p_task_versions[i]
            AND r.closed_at IS NULL AND r.parent_run_id IS NULL
            AND EXISTS (SELECT 1 FROM workflow_tasks w
                WHERE w.run_id = r.run_id AND w.token = p_tokens[i])
            AND NOT EXISTS (SELECT 1 FROM runs c
                WHERE c.parent_run_id = r.run_id AND c.closed_at IS NULL)
        RETURNING r.next_seq, r.task_version INTO new_next_seq, new_version;
        IF FOUND THEN
            INSERT INTO history (run_id, seq, type, time, data)
            SELECT p_run_ids[i], new_next_seq - p_event_counts[i] + e.k - 1,
                p_event_types[done_events + e.k], p_times[i], p_event_data[done_events + e.k]
            FROM generate_series(1, p_event_counts[i]) AS e(k);
            DELETE FROM workflow_tasks WHERE run_id = p_run_ids[i];
            DELETE FROM activity_tasks WHERE run_id = p_run_ids[i];
            DELETE FROM timers WHERE run_id = p_run_ids[i];
            UPDATE updates SET state = 'rejected', failure = p_rejections[i]
            WHERE run_id = p_run_ids[i] AND state IN ('requested', 'accepted');
            o_index := i - 1;
            o_next_seq := new_next_seq;
            o_task_version := new_version;
            RETURN NEXT;
        END IF;
        done_events := done_events + p_event_counts[i];
    END LOOP;
END
$$;
