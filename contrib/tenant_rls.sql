-- Row-level security for a multi-tenant application: the role `app_tenant` reads only the
-- endpoints, events (in the log and after it), deliveries and history of the tenant named in its session setting app.tenant_id
-- (SET app.tenant_id = 'acme', or per transaction with SET LOCAL), and never a secret.
--
-- The extension's own functions and the worker run as the extension's owner, which row-level
-- security does not restrict, so delivery is unaffected. Run as the extension's owner, after
-- CREATE EXTENSION (and again after an upgrade that adds tables).

GRANT USAGE ON SCHEMA outbox TO app_tenant;
GRANT SELECT (id, url, event_types, enabled, disabled_reason, timeout, headers, tenant_id,
              description, created_at, updated_at, deleted_at)
    ON outbox.endpoint TO app_tenant;
GRANT SELECT ON outbox.log, outbox.event, outbox.delivery, outbox.attempt, outbox.history TO app_tenant;

ALTER TABLE outbox.endpoint ENABLE ROW LEVEL SECURITY;
ALTER TABLE outbox.event    ENABLE ROW LEVEL SECURITY;
ALTER TABLE outbox.delivery ENABLE ROW LEVEL SECURITY;
ALTER TABLE outbox.attempt  ENABLE ROW LEVEL SECURITY;
-- The partitioned tables: a policy on the parent applies to what is read through it (the
-- role is granted no partition of its own).
ALTER TABLE outbox.log      ENABLE ROW LEVEL SECURITY;
ALTER TABLE outbox.history  ENABLE ROW LEVEL SECURITY;

CREATE POLICY tenant_isolation ON outbox.endpoint FOR SELECT TO app_tenant
    USING (tenant_id = current_setting('app.tenant_id', true));
CREATE POLICY tenant_isolation ON outbox.event FOR SELECT TO app_tenant
    USING (tenant_id = current_setting('app.tenant_id', true));
CREATE POLICY tenant_isolation ON outbox.delivery FOR SELECT TO app_tenant
    USING (tenant_id = current_setting('app.tenant_id', true));
CREATE POLICY tenant_isolation ON outbox.attempt FOR SELECT TO app_tenant
    USING (EXISTS (SELECT 1 FROM outbox.delivery d
                    WHERE d.id = delivery_id AND d.tenant_id = current_setting('app.tenant_id', true)));
CREATE POLICY tenant_isolation ON outbox.log FOR SELECT TO app_tenant
    USING (tenant_id = current_setting('app.tenant_id', true));
CREATE POLICY tenant_isolation ON outbox.history FOR SELECT TO app_tenant
    USING (tenant_id = current_setting('app.tenant_id', true));
-- With row-level security on, a role no policy admits may do nothing: producers writing
-- through outbox.trigger (which inserts as the writing role) keep their append. Who may
-- insert at all is still what outbox.grant_producer granted.
CREATE POLICY producers_append ON outbox.log FOR INSERT WITH CHECK (true);
