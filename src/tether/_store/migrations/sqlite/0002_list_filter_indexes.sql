-- Listing and counting runs by status or type (tether workflow list/count, the list API).
CREATE INDEX IF NOT EXISTS runs_by_status ON runs(namespace, status, created_at);
CREATE INDEX IF NOT EXISTS runs_by_type ON runs(namespace, workflow_type, created_at);
