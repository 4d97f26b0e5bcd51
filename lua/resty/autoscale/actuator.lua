-- Actuators: how a scaling decision becomes instances. Each one is { name, call(self, decision) -> ok, err, detail }
-- behind the same retry loop: a timeout per attempt, up to `retries` retries after an exponential backoff with
-- jitter, and an idempotency key that stays the same across the retries of one decision, so that a retried call
-- cannot scale twice. Runs in background timers only (docs/scaling.md).
--
--   webhook:    POST of the decision as JSON, signed with HMAC-SHA256 (X-Autoscale-Signature), Idempotency-Key;
--   kubernetes: GET, then merge-PATCH of the `scale` subresource of a Deployment or StatefulSet (bearer token, CA);
--   standby:    activates or deactivates peers of the upstream's own standby pool (discovery.scale_to): instances
--               kept running out of rotation, nothing called over the network.

local ffi = require "ffi"
local cjson = require "cjson.safe"
local http = require "resty.autoscale.http"
local config = require "resty.autoscale.config"

local ngx = ngx
local fail, number, known, show = config.fail, config.number, config.known, config.show
local format = string.format
local concat = table.concat
local random = math.random
local min = math.min
local tostring = tostring
local setmetatable = setmetatable

local _M = {}

-- The largest answer read from each endpoint (a webhook's body is only quoted in errors; a scale object is small).
local MAX_WEBHOOK_BODY = 64 * 1024
local MAX_KUBERNETES_BODY = 256 * 1024

_M.defaults = { timeout = 2, retries = 3, backoff = 0.2, max_backoff = 5, jitter = 0.2 }

-- Secrets are kept out of the configuration tables (which the status shows), keyed by the actuator's table.
local SECRETS = setmetatable({}, { __mode = "k" })
local ENV_SECRETS = {}

local lib
local mac = ffi.new("uint8_t[32]")

function _M.init(library)
    lib = library
end

local function read_file(path)
    local f, err = io.open(path, "rb")
    if not f then
        return nil, err
    end
    local data = f:read("*a")
    f:close()
    return data
end

-- hex = actuator.hmac_sha256_hex(key, msg)
function _M.hmac_sha256_hex(key, msg)
    local rc = lib.autoscale_hmac_sha256(key, #key, msg, #msg, mac)
    if rc ~= 0 then
        return nil, "hmac failed (code " .. rc .. ")"
    end
    local out = {}
    for i = 0, 31 do
        out[i + 1] = format("%02x", mac[i])
    end
    return concat(out)
end

local RETRY_FIELDS = { timeout = { 0.01, 60 }, retries = { 0, 20, true }, backoff = { 0.001, 60 },
                       max_backoff = { 0.001, 600 }, jitter = { 0, 1 } }

-- out, err = actuator.validate(path, v): a complete copy with defaults, false when v is nil (publish-only).
function _M.validate(path, v)
    if v == nil then
        return false
    end
    if type(v) ~= "table" then
        return fail(path, "must be a table (got %s)", type(v))
    end
    local out = { type = v.type }
    local allowed = { type = true }
    for k in pairs(RETRY_FIELDS) do
        allowed[k] = true
    end
    if v.type == "webhook" then
        for _, k in ipairs { "url", "secret", "secret_env", "secret_file" } do
            allowed[k] = true
        end
    elseif v.type == "kubernetes" then
        for _, k in ipairs { "api", "namespace", "kind", "name", "token_file", "ca_file", "server_name" } do
            allowed[k] = true
        end
    elseif v.type ~= "standby" then
        return fail(path .. ".type", "must be \"webhook\", \"kubernetes\" or \"standby\" (got %s)", show(v.type))
    end
    local ok, err = known(path, v, allowed)
    if not ok then
        return nil, err
    end
    for k, r in pairs(RETRY_FIELDS) do
        out[k], err = number(path .. "." .. k, v[k] == nil and _M.defaults[k] or v[k], r[1], r[2], r[3])
        if out[k] == nil then
            return nil, err
        end
    end
    if v.type == "webhook" then
        local u
        u, err = http.parse_url(v.url)
        if not u then
            return fail(path .. ".url", "%s (got %s)", err, show(v.url))
        end
        out.url = v.url
        local given = (v.secret and 1 or 0) + (v.secret_env and 1 or 0) + (v.secret_file and 1 or 0)
        if given ~= 1 then
            return fail(path, "needs exactly one of secret, secret_env, secret_file (the HMAC key)")
        end
        local secret
        if v.secret ~= nil then
            secret = v.secret
            if type(secret) ~= "string" then
                return fail(path .. ".secret", "must be a string")
            end
        elseif v.secret_env ~= nil then
            -- read in init_by_lua (the master still has its environment) and kept for later validations in workers
            -- (control.tune), whose environment nginx has cleared
            secret = type(v.secret_env) == "string" and (ENV_SECRETS[v.secret_env] or os.getenv(v.secret_env))
            if secret then
                ENV_SECRETS[v.secret_env] = secret
            end
            if not secret then
                return fail(path .. ".secret_env", "environment variable %s is not set", show(v.secret_env))
            end
            out.secret_env = v.secret_env
        else
            secret, err = type(v.secret_file) == "string" and read_file(v.secret_file)
            if not secret then
                return fail(path .. ".secret_file", "cannot read %s: %s", show(v.secret_file), tostring(err))
            end
            secret = secret:gsub("%s+$", "")
            out.secret_file = v.secret_file
        end
        if #secret < 16 then
            return fail(path, "the secret must have at least 16 bytes (got %d)", #secret)
        end
        SECRETS[out] = secret
    elseif v.type == "kubernetes" then
        local u
        u, err = http.parse_url(v.api)
        if not u or u.scheme ~= "https" then
            return fail(path .. ".api", "must be the API server's https:// URL (got %s)", show(v.api))
        end
        out.api = v.api:gsub("/+$", "")
        out.namespace = v.namespace or "default"
        out.kind = v.kind or "deployment"
        out.name = v.name
        for _, k in ipairs { "namespace", "name" } do
            local x = out[k]
            if type(x) ~= "string" or #x > 253 or not x:find("^[a-z0-9][-a-z0-9.]*$") or not x:find("[a-z0-9]$") then
                return fail(path .. "." .. k, "must be a Kubernetes object name (got %s)", show(out[k]))
            end
        end
        if out.kind ~= "deployment" and out.kind ~= "statefulset" then
            return fail(path .. ".kind", "must be \"deployment\" or \"statefulset\" (got %s)", show(out.kind))
        end
        out.server_name = v.server_name or "kubernetes.default.svc"
        if type(out.server_name) ~= "string" or not out.server_name:find("^[%w%.%-]+$") then
            return fail(path .. ".server_name", "must be a host name (got %s)", show(v.server_name))
        end
        out.token_file = v.token_file or "/var/run/secrets/kubernetes.io/serviceaccount/token"
        out.ca_file = v.ca_file or "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
        for _, k in ipairs { "token_file", "ca_file" } do
            local data
            data, err = read_file(out[k])
            if not data then
                return fail(path .. "." .. k, "cannot read %s: %s", show(out[k]), tostring(err))
            end
        end
    end
    return out
end

-- The decision as the JSON body of docs/scaling.md, fields in the documented order.
function _M.body(d)
    local e = cjson.encode
    return concat {
        '{"service":', e(d.service), ',"current":', e(d.current), ',"desired":', e(d.desired),
        ',"reason":', e(d.reason), ',"decision_id":', e(d.decision_id), ',"idempotency_key":', e(d.idempotency_key),
        ',"gateway":', e(d.gateway), ',"fencing_token":', e(d.fencing_token), ',"ts":', format("%.3f", d.ts), '}',
    }
end

-- Whether an answer is worth retrying: network errors, 408, 429 and 5xx.
local function retryable(status)
    return status == nil or status == 408 or status == 429 or status >= 500
end

local webhook = {}

function webhook.once(a, d, body)
    local sig, err = _M.hmac_sha256_hex(SECRETS[a] or "", body)
    if not sig then
        return nil, err, false
    end
    local status, resp = http.request {
        url = a.url, method = "POST", body = body, timeout = a.timeout, max_body = MAX_WEBHOOK_BODY,
        headers = { ["Content-Type"] = "application/json", ["X-Autoscale-Signature"] = "sha256=" .. sig,
                    ["Idempotency-Key"] = d.idempotency_key },
    }
    if status and status >= 200 and status < 300 then
        return true
    end
    return nil, status and ("webhook answered " .. status .. ": " .. tostring(resp):sub(1, 200)) or resp,
           retryable(status)
end

local kubernetes = {}

function kubernetes.once(a, d)
    local token, err = read_file(a.token_file)
    if not token then
        return nil, "cannot read token_file: " .. tostring(err), false
    end
    local url = format("%s/apis/apps/v1/namespaces/%s/%ss/%s/scale", a.api, a.namespace, a.kind, a.name)
    local auth = "Bearer " .. token:gsub("%s+$", "")
    local status, body = http.request { url = url, method = "GET", timeout = a.timeout, server_name = a.server_name,
                                        max_body = MAX_KUBERNETES_BODY, headers = { Authorization = auth, Accept = "application/json" } }
    if status ~= 200 then
        return nil, status and ("GET scale answered " .. status .. ": " .. tostring(body):sub(1, 200)) or body,
               retryable(status)
    end
    local scale = cjson.decode(body)
    local replicas = type(scale) == "table" and type(scale.spec) == "table" and scale.spec.replicas
    if replicas == d.desired then
        return true -- already there (an earlier attempt went through): nothing to do
    end
    status, body = http.request {
        url = url, method = "PATCH", timeout = a.timeout, server_name = a.server_name, max_body = MAX_KUBERNETES_BODY,
        body = format('{"spec":{"replicas":%d}}', d.desired),
        headers = { Authorization = auth, Accept = "application/json",
                    ["Content-Type"] = "application/merge-patch+json" },
    }
    if status == 200 then
        return true
    end
    return nil, status and ("PATCH scale answered " .. status .. ": " .. tostring(body):sub(1, 200)) or body,
           retryable(status) or status == 409
end

local standby = {}

-- The pool is in shared memory: the change reaches every worker at once; a pool too small is no retryable error.
function standby.once(_, d)
    local serving, err = require("resty.autoscale.discovery").scale_to(d.service, d.desired)
    if not serving then
        return nil, err, false
    end
    return true
end

local KINDS = { webhook = webhook, kubernetes = kubernetes, standby = standby }

-- delay = actuator.backoff(a, attempt): the pause after failed attempt `attempt` (1-based): exponential, capped,
-- minus up to `jitter` of it at random (so that retries of several gateways do not line up).
function _M.backoff(a, attempt)
    local d = min(a.max_backoff, a.backoff * 2 ^ (attempt - 1))
    return d * (1 - a.jitter * random())
end

-- ok, err, attempts, again = actuator.call(a, decision): runs the actuator with its retries; in a timer (it sleeps).
-- `again` is true when the last failure was one worth retrying (no answer, a 5xx), false for a refusal.
function _M.call(a, d)
    local kind = KINDS[a.type]
    local body = _M.body(d)
    local err, again
    for attempt = 1, a.retries + 1 do
        local ok
        ok, err, again = kind.once(a, d, body)
        if ok then
            return true, nil, attempt
        end
        if not again or attempt > a.retries then
            return nil, err, attempt, again
        end
        ngx.sleep(_M.backoff(a, attempt))
    end
    return nil, err, a.retries + 1, again
end

return _M
