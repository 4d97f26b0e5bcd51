-- Events (ejections, recoveries, panic mode, configuration and operator changes) from the shared ring: written to
-- the nginx error log exactly once across all workers (and optionally to a JSON-lines file), and readable as a list.

local ffi = require "ffi"
require "resty.autoscale.lib" -- declares the C types
local cjson = require "cjson.safe"

local ngx = ngx
local ngx_log = ngx.log
local ngx_WARN = ngx.WARN
local ngx_NOTICE = ngx.NOTICE
local ngx_ERR = ngx.ERR
local io_open = io.open
local tonumber = tonumber

local _M = {}

local BATCH = 64
local lib, conf
local buf = ffi.new("autoscale_event_t[?]", BATCH)
local from, to, next_seq = ffi.new("uint64_t[1]"), ffi.new("uint64_t[1]"), ffi.new("uint64_t[1]")
local text = ffi.new("uint8_t[1024]")

function _M.init(library, configuration)
    lib, conf = library, configuration
end

local function json(e)
    local n = lib.autoscale_event_json(e, text, 1024)
    if n < 0 or n > 1024 then
        return nil
    end
    return ffi.string(text, n)
end

-- Writes the events no worker has written yet (called from every worker's timer; each event is claimed once).
function _M.flush()
    if lib.autoscale_events_claim(from, to) ~= 0 or from[0] >= to[0] then
        return 0
    end
    local written, seq = 0, from[0]
    local file, err
    if conf.event_log then
        file, err = io_open(conf.event_log, "a")
        if not file then
            ngx_log(ngx_ERR, "resty.autoscale: cannot open event_log ", conf.event_log, ": ", err)
        end
    end
    while seq < to[0] do
        local n = lib.autoscale_events_read(seq, buf, BATCH, next_seq)
        if n <= 0 then
            break
        end
        for i = 0, n - 1 do
            local e = buf[i]
            if e.seq >= to[0] then
                break
            end
            local line = json(e)
            if line then
                ngx_log(lib.autoscale_event_is_warning(e.kind) == 1 and ngx_WARN or ngx_NOTICE,
                        "resty.autoscale event: ", line)
                if file then
                    file:write(line, "\n")
                end
                written = written + 1
            end
        end
        seq = next_seq[0]
    end
    if file then
        file:close()
    end
    return written
end

-- list = events.recent(max, since?): the most recent events (at most `max`), oldest first, as Lua tables.
function _M.recent(max, since)
    local out = {}
    local seq = since or 0
    while true do
        local n = lib.autoscale_events_read(seq, buf, BATCH, next_seq)
        if n <= 0 then
            break
        end
        for i = 0, n - 1 do
            local line = json(buf[i])
            out[#out + 1] = line and cjson.decode(line)
        end
        seq = tonumber(next_seq[0])
    end
    local first = #out - (max or 100) + 1
    if first > 1 then
        local trimmed = {}
        for i = first, #out do
            trimmed[#trimmed + 1] = out[i]
        end
        out = trimmed
    end
    return out
end

-- The dependencies of `dependency_down` / `dependency_up` events, by name (codes of autoscale_event_dependency).
local DEPENDENCIES = { redis = 1, etcd = 2, dns = 3, prometheus = 4, actuator = 5, consul = 6, kubernetes = 7 }
local episodes = {} -- this worker's open episodes: ["<upstream>/<dependency>"] = { since =, failures = }

-- down = events.dependency(upstream, dependency, ok): the outcome of one attempt of this worker to reach
-- `dependency` (a name of DEPENDENCIES) for upstream index `upstream` (nil: for none). The first failure opens an
-- episode (one `dependency_down` event, logged like every event; the caller logs `err`); the next success closes it (one `dependency_up`
-- event with the failed attempts and how long it lasted). Returns true while an episode is open. One event per
-- episode, not per attempt: only the worker that talks to the dependency calls this.
function _M.dependency(upstream, dependency, ok)
    local code = DEPENDENCIES[dependency]
    if not code or not lib then
        return false
    end
    local up = upstream or 0xffffffff
    local key = up .. "/" .. dependency
    local ep = episodes[key]
    ngx.update_time()
    if ok then
        if ep then
            episodes[key] = nil
            lib.autoscale_event_dependency(up, code, 1, ep.failures, ngx.now() - ep.since)
        end
        return false
    end
    if ep then
        ep.failures = ep.failures + 1
        return true
    end
    episodes[key] = { since = ngx.now(), failures = 1 }
    lib.autoscale_event_dependency(up, code, 0, 1, 0)
    return true
end

return _M
