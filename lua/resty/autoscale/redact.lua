-- Credentials out of what the status, the dashboard and the admin API show.
--
--   copy = redact.value(v)
--
-- A deep copy of `v` in which the value of every key that names a credential (token, password, secret,
-- authorization, api key, credential, private key; not the `*_env` / `*_file` options that only say where one is)
-- is "[redacted]", and in every string the userinfo of a URL (`scheme://user:pass@host`) and the value of a query
-- parameter that names a credential (`?token=...`, `&access_key=...`) are "[redacted]". Tables shared by several
-- keys are copied once; cycles are kept.
local type, pairs, find, lower, gsub = type, pairs, string.find, string.lower, string.gsub
local setmetatable, getmetatable = setmetatable, getmetatable

local _M = {}

local MASK = "[redacted]"
local NAMES = { "token", "password", "passwd", "secret", "authorization", "api_key", "apikey", "access_key",
                "credential", "private_key", "signature" }

local function sensitive(name)
    local n = lower(name)
    if find(n, "_env$") or find(n, "_file$") then
        return false
    end
    for i = 1, #NAMES do
        if find(n, NAMES[i], 1, true) then
            return true
        end
    end
    return false
end

local function param(sep, name, value)
    if value ~= "" and sensitive(name) then
        return sep .. name .. "=" .. MASK
    end
end

-- text = redact.text(s): `s` with URL userinfo and credential query parameters masked.
function _M.text(s)
    s = gsub(s, "(%a[%w+.-]*://)[^/@%s\"'?#]+@", "%1" .. MASK .. "@")
    return (gsub(s, "([?&;])([%w_.%-]+)=([^&;%s\"'#]*)", param))
end

local function copy(v, seen)
    local t = type(v)
    if t == "string" then
        return _M.text(v)
    end
    if t ~= "table" then
        return v
    end
    if seen[v] then
        return seen[v]
    end
    local out = {}
    seen[v] = out
    for k, x in pairs(v) do
        if type(k) == "string" and sensitive(k) and (type(x) == "string" or type(x) == "table") then
            out[k] = MASK
        else
            out[k] = copy(x, seen)
        end
    end
    return setmetatable(out, getmetatable(v))
end

function _M.value(v)
    return copy(v, {})
end

return _M
