-- Rows as the release before versioned migrations (commit 90e2e33, gateway/store.py) wrote them:
-- the same statements its SQLiteStore ran, one transaction per store call, with the values its
-- serialisation produced (targets' fields by pydantic's model_dump_json, the rest by json.dumps).

-- create_target(TargetSpec(name="Harry Potter", aliases=["HP"], forbidden=["Hogwarts"]))
BEGIN IMMEDIATE;
INSERT INTO targets (id, name, name_key, fields, version, created_at, updated_at)
VALUES ('tgt_0123456789abcdef01234567', 'Harry Potter', 'harry potter',
        '{"aliases":["HP"],"description":"","documents":[],"examples":[],"forbidden":["Hogwarts"],"policy":"steer","enabled":true}',
        1, '2025-01-02T03:04:05+00:00', '2025-01-02T03:04:05+00:00')
ON CONFLICT (id) DO UPDATE SET name = excluded.name, name_key = excluded.name_key,
    fields = excluded.fields, version = excluded.version, updated_at = excluded.updated_at;
UPDATE revision SET value = value + 1;
INSERT INTO audit (time, kind, action, target_ids, request_id, suppressed_tokens, detail, prompt)
VALUES ('2025-01-02T03:04:05+00:00', 'admin', 'target.create', '["tgt_0123456789abcdef01234567"]', NULL, 0,
        '{"name": "Harry Potter", "fields": ["aliases", "forbidden", "name"]}', NULL);
INSERT INTO audit_targets (target_id, audit_id) VALUES ('tgt_0123456789abcdef01234567', 1);
COMMIT;

-- update_target(..., TargetPatch(description="a boy wizard", policy="refuse"))
BEGIN IMMEDIATE;
INSERT INTO targets (id, name, name_key, fields, version, created_at, updated_at)
VALUES ('tgt_0123456789abcdef01234567', 'Harry Potter', 'harry potter',
        '{"aliases":["HP"],"description":"a boy wizard","documents":[],"examples":[],"forbidden":["Hogwarts"],"policy":"refuse","enabled":true}',
        2, '2025-01-02T03:04:05+00:00', '2025-01-02T03:05:00+00:00')
ON CONFLICT (id) DO UPDATE SET name = excluded.name, name_key = excluded.name_key,
    fields = excluded.fields, version = excluded.version, updated_at = excluded.updated_at;
UPDATE revision SET value = value + 1;
INSERT INTO audit (time, kind, action, target_ids, request_id, suppressed_tokens, detail, prompt)
VALUES ('2025-01-02T03:05:00+00:00', 'admin', 'target.update', '["tgt_0123456789abcdef01234567"]', NULL, 0,
        '{"name": "Harry Potter", "fields": ["description", "policy"]}', NULL);
INSERT INTO audit_targets (target_id, audit_id) VALUES ('tgt_0123456789abcdef01234567', 2);
COMMIT;

-- append_audit(AuditRecord(kind="request", action="refuse", target_ids=[...], request_id="chatcmpl-1",
--              suppressed_tokens=3, detail={"model": "tiny"}, prompt="Who is Harry Potter?")), prompts
-- not audited
BEGIN IMMEDIATE;
INSERT INTO audit (time, kind, action, target_ids, request_id, suppressed_tokens, detail, prompt)
VALUES ('2025-01-02T03:06:00+00:00', 'request', 'refuse', '["tgt_0123456789abcdef01234567"]', 'chatcmpl-1', 3,
        '{"model": "tiny"}', NULL);
INSERT INTO audit_targets (target_id, audit_id) VALUES ('tgt_0123456789abcdef01234567', 3);
COMMIT;

-- create_job(spec)
BEGIN IMMEDIATE;
INSERT INTO jobs (id, spec, state, created_at, updated_at)
VALUES ('job_0123456789abcdef01234567',
        '{"method": "flat", "targets": ["Harry Potter"], "params": {}, "from_checkpoint": null}', 'queued',
        '2025-01-02T03:07:00+00:00', '2025-01-02T03:07:00+00:00');
INSERT INTO audit (time, kind, action, target_ids, request_id, suppressed_tokens, detail, prompt)
VALUES ('2025-01-02T03:07:00+00:00', 'admin', 'job.create', '[]', NULL, 0,
        '{"job_id": "job_0123456789abcdef01234567", "method": "flat", "targets": ["Harry Potter"]}', NULL);
COMMIT;

-- claim_job("worker-1"), report_job(progress=0.5, message="step 1/2", logs=[...]), then
-- finish_job(..., "succeeded", checkpoint_id="ckpt_flat_1", message="done", logs=[...])
BEGIN IMMEDIATE;
UPDATE jobs SET state = 'running', worker_id = 'worker-1', started_at = '2025-01-02T03:08:00+00:00',
    heartbeat_at = '2025-01-02T03:08:00+00:00', updated_at = '2025-01-02T03:08:00+00:00'
WHERE id = 'job_0123456789abcdef01234567' AND state = 'queued';
COMMIT;
BEGIN IMMEDIATE;
UPDATE jobs SET heartbeat_at = '2025-01-02T03:09:00+00:00', updated_at = '2025-01-02T03:09:00+00:00',
    progress = 0.5, message = 'step 1/2', estimated_finish = '2025-01-02T03:10:00+00:00',
    logs = '["loading the model", "step 1/2"]'
WHERE id = 'job_0123456789abcdef01234567' AND worker_id = 'worker-1' AND state = 'running';
COMMIT;
BEGIN IMMEDIATE;
UPDATE jobs SET state = 'succeeded', finished_at = '2025-01-02T03:10:00+00:00',
    updated_at = '2025-01-02T03:10:00+00:00', heartbeat_at = '2025-01-02T03:10:00+00:00',
    estimated_finish = NULL, checkpoint_id = 'ckpt_flat_1', error = NULL, progress = 1.0, message = 'done',
    logs = '["loading the model", "step 1/2", "step 2/2", "saved ckpt_flat_1"]'
WHERE id = 'job_0123456789abcdef01234567' AND worker_id = 'worker-1' AND state = 'running';
COMMIT;

-- set_serving_checkpoint("ckpt_flat_1", "promote")
BEGIN IMMEDIATE;
UPDATE serving SET checkpoint = 'ckpt_flat_1', previous = 'base', revision = revision + 1,
    updated_at = '2025-01-02T03:11:00+00:00';
INSERT INTO serving_history (checkpoint, previous, action, time)
VALUES ('ckpt_flat_1', 'base', 'promote', '2025-01-02T03:11:00+00:00');
INSERT INTO audit (time, kind, action, target_ids, request_id, suppressed_tokens, detail, prompt)
VALUES ('2025-01-02T03:11:00+00:00', 'admin', 'checkpoint.promote', '[]', NULL, 0,
        '{"checkpoint": "ckpt_flat_1", "previous": "base"}', NULL);
COMMIT;

-- create_job(spec): a second job, still queued when the release was replaced
BEGIN IMMEDIATE;
INSERT INTO jobs (id, spec, state, created_at, updated_at)
VALUES ('job_fedcba9876543210fedcba98',
        '{"method": "ssd", "targets": ["Harry Potter"], "params": {}, "from_checkpoint": "ckpt_flat_1"}',
        'queued', '2025-01-02T03:12:00+00:00', '2025-01-02T03:12:00+00:00');
INSERT INTO audit (time, kind, action, target_ids, request_id, suppressed_tokens, detail, prompt)
VALUES ('2025-01-02T03:12:00+00:00', 'admin', 'job.create', '[]', NULL, 0,
        '{"job_id": "job_fedcba9876543210fedcba98", "method": "ssd", "targets": ["Harry Potter"]}', NULL);
COMMIT;
