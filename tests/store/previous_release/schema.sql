BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS targets (
    position INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, so page cursors survive deletions
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    name_key TEXT NOT NULL UNIQUE,
    fields TEXT NOT NULL,
    version INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS revision (
    single INTEGER PRIMARY KEY CHECK (single = 1),
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO revision VALUES (1, 0);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    kind TEXT NOT NULL,
    action TEXT NOT NULL,
    target_ids TEXT NOT NULL,
    request_id TEXT,
    suppressed_tokens INTEGER NOT NULL,
    detail TEXT NOT NULL,
    prompt TEXT
);
CREATE INDEX IF NOT EXISTS audit_by_kind ON audit (kind, id);
CREATE TABLE IF NOT EXISTS audit_targets (
    target_id TEXT NOT NULL,
    audit_id INTEGER NOT NULL REFERENCES audit (id),
    PRIMARY KEY (target_id, audit_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS jobs (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    message TEXT,
    estimated_finish TEXT,
    logs TEXT NOT NULL DEFAULT '[]',
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    updated_at TEXT NOT NULL,
    worker_id TEXT,
    heartbeat_at TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    checkpoint_id TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, position);
CREATE TABLE IF NOT EXISTS serving (
    single INTEGER PRIMARY KEY CHECK (single = 1),
    checkpoint TEXT NOT NULL,
    previous TEXT,
    revision INTEGER NOT NULL,
    updated_at TEXT
);
INSERT OR IGNORE INTO serving (single, checkpoint, revision) VALUES (1, 'base', 0);
CREATE TABLE IF NOT EXISTS serving_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    checkpoint TEXT NOT NULL,
    previous TEXT NOT NULL,
    action TEXT NOT NULL,
    time TEXT NOT NULL
);
COMMIT;
