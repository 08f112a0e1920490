-- Workflow tasks completed in one round trip: the completions of many runs that share
-- a transaction, each with no other write than its own rows, by one call instead of a
-- statement each. For each run, in order, a function does what the run's lone
-- completion statement does (SqlWorkflowTasks._complete_workflow_task) if the lease
-- token and task version still hold, and returns (its index in the arrays, the new
-- next_seq, the new task_version); the caller completes the others on their own. Every
-- statement is by primary key, so no plan depends on the tables' statistics. Each
-- statement takes a fresh snapshot (VOLATILE): a cleanup sees what committed while the
-- run's row was waited for.
-- Arguments: per run, its id, task version and lease token, how many events it appends
-- and its time; the events' types and data, run after run; then the function's own.

-- Runs whose task closes them (the workflow returned or failed) with no parent or
-- running child to tell: close, append the events, drop the run's pending work (task
-- rows, activities, timers) and answer its open updates.
CREATE OR REPLACE FUNCTION tether_close_runs(
    p_run_ids TEXT[], p_task_versions BIGINT[], p_tokens TEXT[], p_event_counts BIGINT[],
    p_times DOUBLE PRECISION[], p_event_types TEXT[], p_event_data TEXT[],
    p_statuses TEXT[], p_results TEXT[], p_failures TEXT[], p_rejections TEXT[]
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

-- Runs whose task leaves them waiting (on timers it starts, or for input) with no input
-- come in since the task read it: append the events, start the timers, drop the task
-- row. A run that did get input meanwhile is left to its own completion, which queues
-- its next task.
CREATE OR REPLACE FUNCTION tether_complete_waiting_tasks(
    p_run_ids TEXT[], p_task_versions BIGINT[], p_tokens TEXT[], p_event_counts BIGINT[],
    p_times DOUBLE PRECISION[], p_event_types TEXT[], p_event_data TEXT[],
    p_inputs_through BIGINT[], p_timer_counts BIGINT[], p_timer_seqs BIGINT[],
    p_timer_fire_at DOUBLE PRECISION[]
) RETURNS TABLE (o_index INT, o_next_seq BIGINT, o_task_version BIGINT)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    i INT;
    done_events INT := 0;
    done_timers INT := 0;
    new_next_seq BIGINT;
    new_version BIGINT;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_run_ids, 1), 0) LOOP
        UPDATE runs r SET task_version = r.task_version + 1, task_failure = NULL,
            next_seq = r.next_seq + p_event_counts[i]
        WHERE r.run_id = p_run_ids[i] AND r.task_version = p_task_versions[i]
            AND r.closed_at IS NULL AND r.inbound_seq <= p_inputs_through[i]
            AND EXISTS (SELECT 1 FROM workflow_tasks w
                WHERE w.run_id = r.run_id AND w.token = p_tokens[i])
        RETURNING r.next_seq, r.task_version INTO new_next_seq, new_version;
        IF FOUND THEN
            INSERT INTO history (run_id, seq, type, time, data)
            SELECT p_run_ids[i], new_next_seq - p_event_counts[i] + e.k - 1,
                p_event_types[done_events + e.k], p_times[i], p_event_data[done_events + e.k]
            FROM generate_series(1, p_event_counts[i]) AS e(k);
            INSERT INTO timers (run_id, seq, fire_at)
            SELECT p_run_ids[i], p_timer_seqs[done_timers + t.k],
                p_timer_fire_at[done_timers + t.k]
            FROM generate_series(1, p_timer_counts[i]) AS t(k);
            DELETE FROM workflow_tasks WHERE run_id = p_run_ids[i];
            o_index := i - 1;
            o_next_seq := new_next_seq;
            o_task_version := new_version;
            RETURN NEXT;
        END IF;
        done_events := done_events + p_event_counts[i];
        done_timers := done_timers + p_timer_counts[i];
    END LOOP;
END
$$;
