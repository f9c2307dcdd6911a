-- Named SQL blocks of the journal. `-- name: X` starts a block; named parameters only.

-- name: schema
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS queues (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    settings TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    queue_id INTEGER NOT NULL,
    content TEXT NOT NULL,
    headers TEXT,
    status TEXT NOT NULL,
    delivery_count INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    available_at REAL NOT NULL,
    last_error TEXT,
    dead_lettered_from TEXT,
    lease_id TEXT,
    lease_expires_at REAL,
    delivered_at REAL
);
CREATE INDEX IF NOT EXISTS messages_by_queue_status ON messages (queue_id, status, id);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    type TEXT NOT NULL,
    queue TEXT,
    message_id INTEGER,
    actor TEXT,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_message ON events (message_id, seq) WHERE message_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS users (
    username TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    roles TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    scope_key TEXT PRIMARY KEY,  -- '<queue_id>:<Idempotency-Key>'
    message_id INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS idempotency_keys_by_age ON idempotency_keys (created_at);
CREATE TABLE IF NOT EXISTS queue_counts (
    queue_id INTEGER NOT NULL,
    status TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (queue_id, status)
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', '1');

-- name: write_state
-- Ids never go down, even when the newest messages or queues were deleted: the high-water marks in meta count.
SELECT max((SELECT coalesce(max(id), 0) FROM messages),
           (SELECT coalesce(max(CAST(value AS INTEGER)), 0) FROM meta WHERE key = 'message_id_high')),
       (SELECT coalesce(max(seq), 0) FROM events),
       max((SELECT coalesce(max(id), 0) FROM queues),
           (SELECT coalesce(max(CAST(value AS INTEGER)), 0) FROM meta WHERE key = 'queue_id_high')),
       (SELECT coalesce(max(CAST(value AS INTEGER)), 0) FROM meta WHERE key = 'generation');

-- name: set_high_water
INSERT INTO meta (key, value) VALUES ('message_id_high', :message_id), ('queue_id_high', :queue_id)
ON CONFLICT (key) DO UPDATE SET value = excluded.value;

-- name: last_seq
SELECT coalesce(max(seq), 0) FROM events;

-- name: generation
-- Bumped by every change to the queues (their list or settings): a process whose cached copy is older reloads it.
SELECT coalesce(max(CAST(value AS INTEGER)), 0) FROM meta WHERE key = 'generation';

-- name: set_generation
INSERT INTO meta (key, value) VALUES ('generation', :generation)
ON CONFLICT (key) DO UPDATE SET value = excluded.value;

-- name: counts_ready
SELECT value FROM meta WHERE key = 'counts_ready';

-- name: init_counts
DELETE FROM queue_counts;
INSERT INTO queue_counts (queue_id, status, n) SELECT queue_id, status, count(*) FROM messages GROUP BY queue_id, status;
INSERT OR REPLACE INTO meta (key, value) VALUES ('counts_ready', '1');

-- name: select_counts_of_queues
SELECT queue_id, status, n FROM queue_counts WHERE n != 0 AND queue_id IN (SELECT value FROM json_each(:ids));

-- name: select_queue_counts
SELECT status, n FROM queue_counts WHERE queue_id = :queue_id;

-- name: add_count
INSERT INTO queue_counts (queue_id, status, n) VALUES (:queue_id, :status, :delta)
ON CONFLICT (queue_id, status) DO UPDATE SET n = n + excluded.n;

-- name: delete_queue_counts
DELETE FROM queue_counts WHERE queue_id = :queue_id;

-- name: delete_queue_idempotency_keys
DELETE FROM idempotency_keys WHERE scope_key LIKE :prefix;

-- name: select_queues
SELECT id, name, created_at, updated_at, settings FROM queues ORDER BY name;

-- name: insert_queue
INSERT INTO queues (id, name, created_at, updated_at, settings)
VALUES (:id, :name, :created_at, :updated_at, :settings);

-- name: update_queue
UPDATE queues SET settings = :settings, updated_at = :updated_at WHERE id = :id;

-- name: delete_queue
DELETE FROM queues WHERE id = :id;

-- name: delete_queue_messages
DELETE FROM messages WHERE queue_id = :queue_id;

-- name: purge_queue_messages
DELETE FROM messages WHERE queue_id = :queue_id AND status IN ('pending', 'delayed');

-- name: insert_message
-- A new message's columns only (the others start at their defaults, 0 or NULL): every bound parameter costs.
INSERT INTO messages (id, queue_id, content, headers, status, created_at, updated_at, available_at)
VALUES (:id, :queue_id, :content, :headers, :status, :created_at, :updated_at, :available_at);

-- name: update_message
UPDATE messages
SET queue_id = :queue_id, status = :status, delivery_count = :delivery_count, updated_at = :updated_at,
    available_at = :available_at, last_error = :last_error, dead_lettered_from = :dead_lettered_from,
    lease_id = :lease_id, lease_expires_at = :lease_expires_at, delivered_at = :delivered_at
WHERE id = :id;

-- name: select_messages_by_ids
SELECT id, queue_id, content, headers, status, delivery_count, created_at, updated_at, available_at,
       last_error, dead_lettered_from, lease_id, lease_expires_at, delivered_at
FROM messages WHERE id IN (SELECT value FROM json_each(:ids));

-- name: select_message
SELECT id, queue_id, content, headers, status, delivery_count, created_at, updated_at, available_at,
       last_error, dead_lettered_from, lease_id, lease_expires_at, delivered_at
FROM messages WHERE id = :id;

-- name: browse_messages
SELECT id, queue_id, content, headers, status, delivery_count, created_at, updated_at, available_at,
       last_error, dead_lettered_from, lease_id, lease_expires_at, delivered_at
FROM messages WHERE queue_id = :queue_id AND id > :after_id ORDER BY id LIMIT :limit;

-- name: browse_messages_by_status
SELECT id, queue_id, content, headers, status, delivery_count, created_at, updated_at, available_at,
       last_error, dead_lettered_from, lease_id, lease_expires_at, delivered_at
FROM messages WHERE queue_id = :queue_id AND status = :status AND id > :after_id ORDER BY id LIMIT :limit;

-- name: ids_by_status
SELECT id, lease_expires_at, available_at FROM messages
WHERE queue_id = :queue_id AND status = :status AND id > :after_id ORDER BY id LIMIT :limit;

-- name: oldest_pending
SELECT created_at FROM messages WHERE queue_id = :queue_id AND status = 'pending' ORDER BY id LIMIT 1;

-- name: delete_message
DELETE FROM messages WHERE id = :id;

-- name: select_idempotency_keys
SELECT k.scope_key, k.message_id, k.created_at, m.status
FROM idempotency_keys k LEFT JOIN messages m ON m.id = k.message_id
WHERE k.scope_key IN (SELECT value FROM json_each(:keys));

-- name: upsert_idempotency_key
INSERT INTO idempotency_keys (scope_key, message_id, created_at) VALUES (:scope_key, :message_id, :created_at)
ON CONFLICT (scope_key) DO UPDATE SET message_id = excluded.message_id, created_at = excluded.created_at;

-- name: delete_idempotency_keys_before
DELETE FROM idempotency_keys WHERE created_at < :cutoff;

-- name: redrivable_ids
SELECT id FROM messages
WHERE queue_id = :queue_id
  AND (status = 'failed' OR (status = 'pending' AND dead_lettered_from IN (SELECT name FROM queues)))
ORDER BY id LIMIT :limit;

-- name: expired_terminal_ids
SELECT id FROM messages
WHERE queue_id = :queue_id AND status IN ('processed', 'failed') AND updated_at < :cutoff
ORDER BY id LIMIT :limit;

-- name: insert_event
INSERT INTO events (seq, ts, type, queue, message_id, actor, data)
VALUES (:seq, :ts, :type, :queue, :message_id, :actor, :data);

-- name: message_events
SELECT seq, ts, type, queue, message_id, actor, data FROM events WHERE message_id = :message_id ORDER BY seq;

-- name: events_after
SELECT seq, ts, type, queue, message_id, actor, data FROM events WHERE seq > :after_seq ORDER BY seq LIMIT :limit;

-- name: select_users
SELECT username, password_hash, roles, created_at FROM users ORDER BY username;

-- name: select_user
SELECT username, password_hash, roles, created_at FROM users WHERE username = :username;

-- name: insert_user
INSERT INTO users (username, password_hash, roles, created_at)
VALUES (:username, :password_hash, :roles, :created_at);

-- name: delete_user
DELETE FROM users WHERE username = :username;
