-- Outbound-only workers: how clients reach each worker (`direct`: its own session listener;
-- `outbound-only`: the relay of the controller holding its connection, whose address is then
-- its session_addr), and the load it reported in its last heartbeat.
ALTER TABLE workers ADD COLUMN mode TEXT NOT NULL DEFAULT 'direct';
ALTER TABLE workers ADD COLUMN active_sessions BIGINT;
ALTER TABLE workers ADD COLUMN active_connections BIGINT;
