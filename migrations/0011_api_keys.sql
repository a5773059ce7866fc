-- API keys: each belongs to one tenant and holds roles. Only a digest of the secret is kept
-- (SHA-256: the secret is 256 random bits, so no dictionary or brute force can reach it and a
-- slow password hash would only cost every request time); the secret is shown once, at
-- creation. A key is looked up by its id, which the key string carries in the clear.
CREATE TABLE api_keys (
    id            uuid PRIMARY KEY,
    tenant_id     text NOT NULL,
    name          text NOT NULL,
    roles         text[] NOT NULL CHECK (cardinality(roles) > 0),
    secret_sha256 bytea NOT NULL CHECK (octet_length(secret_sha256) = 32),
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz,
    revoked_at    timestamptz,
    -- The key's request rate on each replica (a token bucket); NULL: unlimited.
    rate_per_second double precision CHECK (rate_per_second > 0),
    rate_burst      integer CHECK (rate_burst > 0)
);

CREATE INDEX api_keys_tenant ON api_keys (tenant_id, id);
