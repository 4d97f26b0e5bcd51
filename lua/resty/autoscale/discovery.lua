-- Service discovery: where an upstream's peers come from, beyond the static `peers` list.
--
--   * standby pool: known instances kept out of rotation until discovery.activate() brings them in (a scale-up) and
--     discovery.deactivate() drains them out again (a scale-down);
--   * DNS: A/AAAA or SRV records, asked again when their TTL runs out (discovery/dns.lua);
--   * etcd v3: the keys under a prefix, through etcd's HTTP/JSON gateway (discovery/etcd.lua);
--   * Consul: a service's instances and their health, with blocking queries (discovery/consul.lua);
--   * Kubernetes: a Service's EndpointSlices, listed then watched (discovery/kubernetes.lua).
--
-- Polled sources (dns, etcd) are asked by the discovery timer; watched ones (consul, kubernetes) by a timer of their
-- own in the worker that holds the lease (their requests wait for a change), which hands each change to the same
-- reconciliation. A source that answers an empty set after it had named peers is not believed for
-- `empty_grace` seconds: only an empty answer that still stands after that long empties it (at once when the
-- upstream's scaler decided for zero instances: then the empty set is what was asked for).
--
-- Sources are asked in background timers, by one worker at a time (the lease the active health checks use: a worker
-- that dies loses it). That worker brings the upstream's peer set to "static ∪ sources ∪ active standby" through
-- autoscale.control, which reaches every worker at once through shared memory and keeps statistics: new peers
-- enter with slow start; a peer that left is drained (no new requests), and removed once its in-flight requests have
-- finished (or drain_timeout has passed). A source that fails keeps its last good set; the failure and the recovery
-- are logged once each, not per attempt. The desired set is computed against the peers in shared memory, so another
-- worker taking the lease over carries on where the last one stopped.

local ffi = require "ffi"
require "resty.autoscale.lib" -- declares the C types
local cjson = require "cjson.safe"
local config = require "resty.autoscale.config"
local control = require "resty.autoscale.control"
local events = require "resty.autoscale.events"
local addr = require "resty.autoscale.discovery.addr"
local redact = require "resty.autoscale.redact"

local ngx = ngx
local ngx_log = ngx.log
local ngx_WARN = ngx.WARN
local ngx_NOTICE = ngx.NOTICE
local ngx_ERR = ngx.ERR
local now = ngx.now
local update_time = ngx.update_time
local type = type
local pairs = pairs
local ipairs = ipairs
local next = next
local pcall = pcall
local tostring = tostring
local tonumber = tonumber
local max = math.max
local sort = table.sort
local concat = table.concat
local format = string.format
local fail, number, known, show = config.fail, config.number, config.known, config.show

local _M = {}

-- Sources, asked in this order; each is a module with validate(path, v) and fetch(conf, last) (see dns.lua).
local SOURCES = { "dns", "etcd", "consul", "kubernetes" }
local MODULES = {
    dns = require "resty.autoscale.discovery.dns",
    etcd = require "resty.autoscale.discovery.etcd",
    consul = require "resty.autoscale.discovery.consul",
    kubernetes = require "resty.autoscale.discovery.kubernetes",
}

_M.defaults = {
    keep_static = true,
    drain_timeout = 30,
    empty_grace = 30,
}

local TICK = 0.1      -- s between looks at the sources' schedules
local SWEEP = 0.5     -- s between reconciliations when nothing changed (drains to finish, standby changes)
local LEASE_MS = 3000 -- how long a worker that stopped running keeps the lease
local BUSY_WARN = 50  -- ticks in a row with the configuration busy before it is logged

local lib, index
local ups = {} -- name -> per-worker state of the upstream's discovery
local stats = ffi.new("autoscale_peer_stats_t")
local addr_buf = ffi.new("uint8_t[64]")
local HEALTH_DRAINING = 3

local function peer_list(path, v, static)
    if type(v) ~= "table" or #v == 0 then
        return fail(path, "must be a non-empty list of \"ip:port\" or { addr = \"ip:port\", weight = n }")
    end
    local taken = {}
    for _, p in ipairs(type(static) == "table" and static or {}) do
        local a = addr.of(p)
        if a then
            taken[a] = "is also in peers"
        end
    end
    local out = {}
    for i, p in ipairs(v) do
        local at = path .. "[" .. i .. "]"
        local weight = 1
        if type(p) == "table" then
            local ok, err = known(at, p, { addr = true, weight = true })
            if not ok then
                return nil, err
            end
            if p.weight ~= nil then
                weight, err = number(at .. ".weight", p.weight, 1, 10000, true)
                if not weight then
                    return nil, err
                end
            end
        end
        local a = addr.of(p)
        if not a then
            return fail(at, "must be \"ip:port\", \"[ipv6]:port\" or { addr = ..., weight = n } (got %s)",
                        show(type(p) == "table" and p.addr or p))
        end
        if taken[a] then
            return fail(at, "%s %s", a, taken[a])
        end
        taken[a] = "is listed twice"
        out[i] = { addr = a, weight = weight }
    end
    return out
end

-- out, err = discovery.validate(path, v, peers): the checked `discovery` option of an upstream (false when unset).
function _M.validate(path, v, static)
    if v == nil or v == false then
        return false
    end
    if type(v) ~= "table" then
        return fail(path, "must be a table (got %s)", type(v))
    end
    local ok, err = known(path, v, { keep_static = true, drain_timeout = true, standby = true, dns = true, etcd = true,
                                     consul = true, kubernetes = true, empty_grace = true })
    if not ok then
        return nil, err
    end
    local out = { keep_static = _M.defaults.keep_static }
    if v.keep_static ~= nil then
        if type(v.keep_static) ~= "boolean" then
            return fail(path .. ".keep_static", "must be true or false (got %s)", show(v.keep_static))
        end
        out.keep_static = v.keep_static
    end
    out.drain_timeout, err = number(path .. ".drain_timeout",
                                    v.drain_timeout == nil and _M.defaults.drain_timeout or v.drain_timeout, 0, 86400)
    if not out.drain_timeout then
        return nil, err
    end
    out.empty_grace, err = number(path .. ".empty_grace",
                                  v.empty_grace == nil and _M.defaults.empty_grace or v.empty_grace, 0, 86400)
    if not out.empty_grace then
        return nil, err
    end
    if v.standby ~= nil then
        out.standby, err = peer_list(path .. ".standby", v.standby, static)
        if not out.standby then
            return nil, err
        end
    end
    for _, kind in ipairs(SOURCES) do
        if v[kind] ~= nil then
            out[kind], err = MODULES[kind].validate(path .. "." .. kind, v[kind])
            if not out[kind] then
                return nil, err
            end
        end
    end
    if not (out.standby or out.dns or out.etcd or out.consul or out.kubernetes) then
        return fail(path, "names no source: give standby, dns, etcd, consul and/or kubernetes")
    end
    return out
end

-- The upstream's peers in shared memory: addr -> { draining =, inflight =, weight = }.
local function current(idx)
    local count = lib.autoscale_upstream_peers(idx, nil, 0)
    if count < 0 then
        return nil, "cannot read the upstream's peers (code " .. count .. ")"
    end
    local slots = ffi.new("uint32_t[?]", count + 1)
    count = lib.autoscale_upstream_peers(idx, slots, count + 1)
    local out = {}
    for i = 0, count - 1 do
        if lib.autoscale_peer_stats(slots[i], stats) == 0 then
            local n = lib.autoscale_peer_addr(slots[i], addr_buf, 64)
            if n > 0 and n <= 64 then
                out[ffi.string(addr_buf, n)] = {
                    draining = stats.health == HEALTH_DRAINING, inflight = stats.inflight, weight = stats.weight,
                }
            end
        end
    end
    return out
end

-- Logs `msg` for `key` unless that same message was the last one logged for it (so a lasting problem is logged
-- once, and again only when it changes).
local function once(u, key, level, msg)
    if u.logged[key] ~= msg then
        u.logged[key] = msg
        ngx_log(level, "resty.autoscale: discovery of ", u.name, ": ", msg)
    end
end

-- want, from_source: addr -> weight of every peer the upstream should have now, and which of them a source named.
local function desired(u, cur)
    local want, from_source, heard, all_heard = {}, {}, false, true
    for _, s in ipairs(u.sources) do
        if s.peers then
            heard = true
            for _, p in ipairs(s.peers) do
                want[p.addr] = max(want[p.addr] or 0, p.weight)
                from_source[p.addr] = true
            end
        else
            all_heard = false
        end
    end
    if all_heard then
        u.carried = nil
    end
    for _, p in ipairs(u.carried or {}) do -- a reload carried them over; their source has not answered yet
        heard = true
        want[p.addr] = want[p.addr] or p.weight
    end
    if u.c.keep_static or not heard then
        for _, p in ipairs(u.static) do
            want[p.addr] = want[p.addr] or p.weight
        end
    end
    for _, p in ipairs(u.c.standby or {}) do
        local c = cur[p.addr]
        if c and not c.draining then
            want[p.addr] = want[p.addr] or p.weight
        end
    end
    return want, from_source
end

-- Applies the round's change set in one reconfiguration. Returns how many of its additions took effect, or nil when
-- another process was changing the configuration (nothing changed: the next tick tries again). When the set is
-- refused for one bad entry, each entry is applied on its own, so that one peer cannot hold the others back.
local function apply(u, set, adds)
    if #set == 0 then
        return 0
    end
    local ok, err, busy = control.change_peers(u.name, set)
    if ok then
        u.busy = nil
        for _, c in ipairs(set) do
            u.logged[(c.weight == 0 and "remove " or "add ") .. c.addr] = nil
            if c.weight == 0 then
                u.drained[c.addr] = nil
            end
        end
        return adds
    end
    if busy then
        u.busy = (u.busy or 0) + 1
        if u.busy == BUSY_WARN then
            once(u, "busy", ngx_WARN, "configuration busy for " .. BUSY_WARN .. " attempts: " .. tostring(err))
        end
        return nil
    end
    local added = 0
    for _, c in ipairs(set) do
        if c.weight == 0 then
            ok, err = control.remove_peer(u.name, c.addr)
            if ok then
                u.drained[c.addr] = nil
            else
                once(u, "remove " .. c.addr, ngx_ERR, "cannot remove " .. c.addr .. ": " .. tostring(err))
            end
        elseif c.new then
            ok, err = control.add_peer(u.name, c.addr, c.weight)
            if ok then
                u.logged["add " .. c.addr] = nil
                added = added + 1
            else
                once(u, "add " .. c.addr, ngx_ERR, "cannot add " .. c.addr .. ": " .. tostring(err))
            end
        else
            control.set_weight(u.name, c.addr, c.weight)
        end
    end
    return added
end

local function count_peers(cur)
    local n = 0
    for _ in pairs(cur) do
        n = n + 1
    end
    return n
end

-- Brings the upstream's peers to the desired set in one change set per round (additions, weight changes and the
-- removal of drained peers: one reconfiguration), adding (and taking back drained peers that came back) before
-- draining, so that the upstream never runs short; then drains the peers that left (removed in a later round once
-- their requests have finished).
local function reconcile(u)
    local cur, err = current(u.idx)
    if not cur then
        return once(u, "read", ngx_ERR, err)
    end
    local want, from_source = desired(u, cur)
    local t = now()
    local set, adds = {}, 0
    local serving = 0 -- peers already serving after this loop (additions are counted once applied)
    for a, w in pairs(want) do
        local c = cur[a]
        if not c then
            set[#set + 1] = { addr = a, weight = w, new = true }
            adds = adds + 1
        elseif c.draining and u.drained[a] then
            if control.enable(u.name, a) ~= nil then
                serving = serving + 1
            end
            u.drained[a] = nil
        else
            serving = serving + (c.draining and 0 or 1)
            if from_source[a] and c.weight ~= w then
                set[#set + 1] = { addr = a, weight = w }
            end
        end
    end
    local to_zero = u.zero and serving + adds == 0 and next(want) == nil
    if serving + adds == 0 and not to_zero then -- never drain the peers that serve now for nothing
        return once(u, "empty", ngx_WARN, next(want) == nil and "no source names any peer: keeping the current ones"
                    or "none of the peers the sources name could be added: keeping the current ones")
    end
    local pending, leaving = false, {}
    for a, c in pairs(cur) do
        if not want[a] then
            if not c.draining then
                leaving[#leaving + 1] = a
            else
                local since = u.drained[a] or t
                u.drained[a] = since
                if c.inflight <= 0 or t - since >= u.c.drain_timeout then
                    set[#set + 1] = { addr = a, weight = 0 }
                else
                    pending = true
                end
            end
        end
    end
    if to_zero then
        -- scaled to zero: every peer drains; the last one stays as a drained record (an upstream keeps one)
        if #leaving == 0 and #set > 0 and #set >= count_peers(cur) then
            set[#set] = nil
        end
    end
    local added = apply(u, set, adds)
    if not added then -- busy: nothing changed, and nothing is drained until the additions are in
        u.pending = true
        return
    end
    if serving + added == 0 and not to_zero then
        return once(u, "empty", ngx_WARN, "none of the peers the sources name could be added: keeping the current ones")
    end
    u.logged.empty = nil
    for _, a in ipairs(leaving) do
        control.drain(u.name, a)
        u.drained[a] = t
        pending = true
    end
    local now_leaving = {}
    for _, a in ipairs(leaving) do
        now_leaving[a] = true
    end
    for a in pairs(u.drained) do -- taken back by someone else, or gone (not those drained just now: cur is older)
        if not now_leaving[a] and (not cur[a] or not cur[a].draining or want[a]) then
            u.drained[a] = nil
        end
    end
    u.pending = pending
end

local function same(a, b)
    if a == nil or #a ~= #b then
        return false
    end
    local seen = {}
    for _, p in ipairs(a) do
        seen[p.addr] = p.weight
    end
    for _, p in ipairs(b) do
        if seen[p.addr] ~= p.weight then
            return false
        end
    end
    return true
end

-- Asks one source; keeps its last good set when it fails.
local function ask(u, s)
    local done, peers, interval, bad, revision = pcall(MODULES[s.kind].fetch, s.conf, s.revision, s.scratch)
    if not done then -- a reply no client should have choked on: a failure like any other
        peers, interval = nil, "raised: " .. tostring(peers)
    end
    update_time()
    local t = now()
    if peers == nil then -- logged once per failure, not per attempt
        if not s.error then
            ngx_log(ngx_WARN, "resty.autoscale: discovery of ", u.name, ": ", s.kind, " failed (", tostring(interval),
                    "); keeping its last good set of ", s.peers and #s.peers or 0, " peers")
        end
        if not s.error then
            s.episodes, s.down_since = (s.episodes or 0) + 1, t
        end
        events.dependency(u.idx, s.kind, false) -- one dependency_down event per episode
        s.error, s.failures, s.streak = tostring(interval), s.failures + 1, s.streak + 1
        -- watched sources back off: retry, doubled per failure in a row up to 8 times retry
        s.next_at = t + (s.watched and s.retry * 2 ^ (s.streak > 4 and 3 or s.streak - 1) or s.retry)
        return false
    end
    if s.error then
        ngx_log(ngx_NOTICE, "resty.autoscale: discovery of ", u.name, ": ", s.kind, " answers again after ",
                s.streak, " failed attempts")
    end
    events.dependency(u.idx, s.kind, true)
    s.error, s.streak, s.last_ok, s.next_at, s.down_since = nil, 0, t, t + interval, nil
    for key, why in pairs(bad or {}) do
        once(u, "bad " .. key, ngx_WARN, s.kind .. " " .. (s.watched and "entry " or "key ") .. key .. " skipped: "
             .. why)
    end
    if peers == false then -- unchanged since last time
        return false
    end
    s.revision = revision
    local kept = {}
    for _, p in ipairs(peers) do -- addresses in the library's form, so that they compare equal
        local a = type(p) == "table" and addr.canonical(p.addr)
        if a then
            kept[#kept + 1] = { addr = a, weight = p.weight, zone = p.zone, node = p.node, health = p.health }
        end
    end
    peers = kept
    sort(peers, function(x, y) return x.addr < y.addr end)
    if #peers == 0 and u.c.empty_grace > 0 then
        local had = s.peers and #s.peers or (u.carried and #u.carried or 0)
        if had > 0 and not (s.empty_since and t - s.empty_since >= u.c.empty_grace)
                and not require("resty.autoscale.scaler").scaled_to_zero(u.name) then
            -- not believed yet: the last set stays until the empty answer has stood for empty_grace
            if not s.empty_since then
                s.empty_since = t
                ngx_log(ngx_WARN, "resty.autoscale: discovery of ", u.name, ": ", s.kind, " answers an empty set; ",
                        "keeping its last ", had, " peers unless the empty answer still stands in ", u.c.empty_grace,
                        " s")
            end
            return false
        end
    end
    if s.empty_since then
        ngx_log(ngx_NOTICE, "resty.autoscale: discovery of ", u.name, ": ", s.kind,
                #peers == 0 and (" empty set confirmed after " .. u.c.empty_grace .. " s")
                or (" names " .. #peers .. " peers again; the empty answer was not applied"))
        s.empty_since = nil
    end
    if same(s.peers, peers) then
        if s.peers then
            s.peers = peers -- the same addresses and weights; health, zone and node may have moved
        end
        return false
    end
    s.peers, s.changed_at = peers, t
    return true
end

-- The timer of a watched source (consul, kubernetes) in the worker that holds the lease: asks it again as soon as
-- an answer is in (each request waits for a change on the server's side), sleeping only to honour next_at
-- (a minimum gap, and the backoff after failures); a change makes the discovery timer reconcile at its next tick.
-- Ends when this worker loses the lease, exits, or is configured anew.
local function watch(premature, u, s)
    if premature then
        s.watching = false
        return
    end
    local done, err = pcall(function()
        while u.owner and ups[u.name] == u and not ngx.worker.exiting() do
            update_time()
            local wait = s.next_at - now()
            if wait > 0 then
                ngx.sleep(wait < 0.001 and 0.001 or wait < 1 and wait or 1)
            elseif ask(u, s) then
                u.changed = true
            end
        end
    end)
    s.watching = false
    if not done then
        ngx_log(ngx_ERR, "resty.autoscale: discovery of ", u.name, ": ", s.kind, " watch failed: ", tostring(err))
    end
end

-- A worker that takes the lease over starts its sources afresh, carrying the peers they found before (those in
-- shared memory that are neither static nor standby) until each has answered: so a registry that is away when the
-- lease moves does not take its peers out.
local function take_over(u)
    if u.carried == nil or #u.carried == 0 then
        local cur = current(u.idx) or {}
        local pooled = {}
        for _, p in ipairs(u.static) do
            pooled[p.addr] = true
        end
        for _, p in ipairs(u.c.standby or {}) do
            pooled[p.addr] = true
        end
        local carried = {}
        for a, c in pairs(cur) do
            if not c.draining and not pooled[a] then
                carried[#carried + 1] = { addr = a, weight = c.weight }
            end
        end
        u.carried = #carried > 0 and carried or nil
    end
    for _, s in ipairs(u.sources) do
        s.peers, s.revision, s.scratch, s.empty_since, s.next_at = nil, nil, {}, nil, 0
    end
end

-- One look at upstream `u`: when this worker holds the lease, ask the sources that are due and reconcile.
local function step(u)
    if lib.autoscale_check_lease(u.idx, LEASE_MS) ~= 1 then
        u.owner = false
        return
    end
    if not u.owner then -- this worker takes the lease (over): its sources start afresh
        take_over(u)
    end
    u.owner = true
    update_time()
    local changed = u.changed
    u.changed = false
    for _, s in ipairs(u.sources) do
        if s.watched then
            if not s.watching then
                s.watching = true
                local ok, err = ngx.timer.at(0, watch, u, s)
                if not ok then
                    s.watching = false
                    once(u, "watch " .. s.kind, ngx_ERR, "cannot start the " .. s.kind .. " watch: " .. tostring(err))
                end
            end
            if s.empty_since and now() - s.empty_since >= u.c.empty_grace and not s.error then
                s.peers, s.changed_at, s.empty_since = {}, now(), nil -- the empty answer stood: believed
                ngx_log(ngx_NOTICE, "resty.autoscale: discovery of ", u.name, ": ", s.kind, " empty set confirmed ",
                        "after ", u.c.empty_grace, " s")
                changed = true
            end
        elseif now() >= s.next_at and ask(u, s) then
            changed = true
        end
    end
    if (changed or u.pending or now() >= u.next_sweep) and lib.autoscale_check_lease(u.idx, LEASE_MS) == 1 then
        reconcile(u)
        u.next_sweep = now() + SWEEP
    end
end

-- discovery.carry_over(lib, conf): called by autoscale.configure before it applies `conf`. On a reload, the peers an
-- upstream with discovery has now (found by its sources, or standby peers activated) go into the new configuration
-- next to its static peers (with keep_static = false: instead of them), so that they keep serving and keep their
-- statistics rather than being dropped until the first refresh. Peers being drained out are left out.
function _M.carry_over(library, configuration)
    for name, uc in pairs(configuration.upstreams) do
        local c = uc.discovery
        if c then
            c.static = {}
            for i, p in ipairs(uc.peers) do
                c.static[i] = { addr = addr.canonical(p.addr) or p.addr, weight = p.weight }
            end
            local idx = library.autoscale_upstream_find(name, #name)
            lib = library
            local cur = idx >= 0 and current(idx) or {}
            local peers, seen, pooled = {}, {}, {}
            for _, p in ipairs(c.static) do
                pooled[p.addr] = true
            end
            for _, p in ipairs(c.standby or {}) do
                pooled[p.addr] = true
            end
            c.carried = {} -- found by a source: kept until every source has answered again
            for a, p in pairs(cur) do
                if not p.draining then
                    peers[#peers + 1] = { addr = a, weight = p.weight }
                    seen[a] = true
                    if not pooled[a] then
                        c.carried[#c.carried + 1] = peers[#peers]
                    end
                end
            end
            if #peers > 0 and c.keep_static == false then
                uc.peers = peers
            else
                for _, p in ipairs(c.static) do
                    if not seen[p.addr] then
                        peers[#peers + 1] = p
                    end
                end
                uc.peers = peers
            end
            sort(uc.peers, function(x, y) return x.addr < y.addr end)
        end
    end
end

-- discovery.init(lib, conf, index): called by autoscale.configure.
function _M.init(library, configuration, upstream_index)
    lib, index = library, upstream_index
    ups = {}
    for name, uc in pairs(configuration.upstreams) do
        local c = uc.discovery
        if c then
            local u = {
                name = name, idx = upstream_index[name], c = c, sources = {}, drained = {}, logged = {},
                static = {}, carried = c.carried, next_sweep = 0, pending = false, owner = false,
                -- a service that scales to zero may have no peer: sources naming none drain them all
                zero = uc.scaling and uc.scaling.min == 0 or false,
            }
            for i, p in ipairs(c.static or uc.peers) do -- what nginx.conf lists (carry_over may have added peers)
                u.static[i] = { addr = addr.canonical(p.addr) or p.addr, weight = p.weight }
            end
            for _, kind in ipairs(SOURCES) do
                if c[kind] then
                    u.sources[#u.sources + 1] = {
                        kind = kind, conf = c[kind], next_at = 0, failures = 0, streak = 0, scratch = {},
                        retry = kind == "dns" and c[kind].min_ttl or c[kind].retry or c[kind].interval,
                        watched = MODULES[kind].watch,
                    }
                end
            end
            ups[name] = u
        end
    end
end

-- ok, err = discovery.start(): the discovery timers of this worker (one per upstream with discovery).
function _M.start()
    for name, u in pairs(ups) do
        local busy = false
        local ok, err = ngx.timer.every(TICK, function(premature)
            if premature then -- the worker is exiting (a reload): its successor takes over without waiting
                if u.owner then
                    u.owner = false
                    lib.autoscale_check_lease(u.idx, 0)
                end
                return
            end
            if busy then
                return
            end
            busy = true
            local done, perr = pcall(step, u)
            busy = false
            if not done then
                ngx_log(ngx_ERR, "resty.autoscale: discovery of ", name, " failed: ", perr)
            end
        end)
        if not ok then
            return nil, err
        end
    end
    return true
end

-- u, peers, serving = pool(name, n): the upstream's discovery state, its peers now and how many of them are not
-- draining; or nil and why `name` or `n` is wrong.
local function pool(name, n)
    if not lib then
        return nil, "resty.autoscale is not configured"
    end
    if not index[name] then
        return nil, "unknown upstream " .. tostring(name)
    end
    local u = ups[name]
    if not u or not u.c.standby then
        return nil, "upstream " .. name .. " has no standby pool (discovery.standby)"
    end
    if type(n) ~= "number" or n ~= n or n % 1 ~= 0 or n < 0 or n > 65536 then
        return nil, "count must be an integer between 0 and 65536 (got " .. show(n) .. ")"
    end
    local cur, err = current(u.idx)
    if not cur then
        return nil, err
    end
    local serving = 0
    for _, c in pairs(cur) do
        serving = serving + (c.draining and 0 or 1)
    end
    return u, cur, serving
end

-- n, addrs = discovery.activate(name, n): brings up to `n` standby peers into rotation (in the order of the pool;
-- a peer still draining out comes straight back). Returns how many it activated and their addresses (fewer than `n`
-- when the pool runs out), or nil and the reason.
function _M.activate(name, n)
    local u, cur = pool(name, n)
    if not u then
        return nil, cur
    end
    local done, err = {}, nil
    for _, p in ipairs(u.c.standby) do
        if #done >= n then
            break
        end
        local c, ok = cur[p.addr], nil
        if not c then
            ok, err = control.add_peer(name, p.addr, p.weight)
        elseif c.draining then
            ok, err = control.enable(name, p.addr)
        end
        if ok then
            done[#done + 1] = p.addr
        elseif err then
            return nil, err
        end
    end
    return #done, done
end

-- n, addrs = discovery.deactivate(name, n): drains up to `n` active standby peers (the last activated first): no
-- new requests; the discovery timer removes each once its in-flight requests have finished (or drain_timeout has
-- passed). Never drains the upstream's last serving peer.
function _M.deactivate(name, n)
    local u, cur, serving = pool(name, n)
    if not u then
        return nil, cur
    end
    local err
    local done = {}
    for i = #u.c.standby, 1, -1 do
        local a = u.c.standby[i].addr
        if #done >= n or serving <= 1 then
            break
        end
        local c = cur[a]
        if c and not c.draining then
            local ok
            ok, err = control.drain(name, a)
            if ok == nil then
                return nil, err
            end
            done[#done + 1] = a
            serving = serving - 1
        end
    end
    return #done, done
end

-- serving, err = discovery.scale_to(name, desired): activates or deactivates standby peers so that `desired` peers
-- serve (static and discovered peers count too), as far as the pool allows. Returns how many serve afterwards.
-- What a scaler's actuator calls when the standby pool is where its instances come from.
function _M.scale_to(name, desired)
    local u, err, serving = pool(name, desired)
    if not u then
        return nil, err
    end
    local n = 0
    if desired > serving then
        n, err = _M.activate(name, desired - serving)
    elseif desired < serving then
        n, err = _M.deactivate(name, serving - desired)
        n = n and -n
    end
    if not n then
        return nil, err
    end
    return serving + n
end

-- st, err = discovery.state(name): the standby pool as all workers see it, and the sources as this worker knows
-- them (`runs_here` tells whether this worker asks them; only that worker has their latest answers).
function _M.state(name)
    if not lib then
        return nil, "resty.autoscale is not configured"
    end
    local u = ups[name]
    if not u then
        return nil, index[name] and ("upstream " .. name .. " has no discovery") or ("unknown upstream " .. tostring(name))
    end
    local cur = current(u.idx) or {}
    local out = { runs_here = u.owner, worker = ngx.worker.pid(), keep_static = u.c.keep_static, sources = {} }
    if u.c.standby then
        local sb = { size = #u.c.standby, active = 0, draining = 0, peers = {} }
        for i, p in ipairs(u.c.standby) do
            local c = cur[p.addr]
            local st = not c and "standby" or c.draining and "draining" or "active"
            if st ~= "standby" then
                sb[st] = sb[st] + 1
            end
            sb.peers[i] = { addr = p.addr, state = st, inflight = c and c.inflight or 0 }
        end
        out.standby = sb
    end
    local t = now()
    for _, s in ipairs(u.sources) do
        local list, detail = {}, nil
        for i, p in ipairs(s.peers or {}) do
            list[i] = p.addr
            if p.zone or p.node or p.health then
                detail = detail or {}
                detail[p.addr] = { weight = p.weight, zone = p.zone, node = p.node, health = p.health }
            end
        end
        out.sources[s.kind] = {
            ok = s.last_ok ~= nil and s.error == nil,
            error = s.error,
            failures = s.failures,
            peers = u.owner and list or nil,
            last_ok_ago = s.last_ok and (t - s.last_ok) or nil,
            next_in = u.owner and max(0, s.next_at - t) or nil,
            revision = s.revision or (s.scratch and s.scratch.rv),
            -- an episode: from the first failed attempt to the next answer (logged once each way)
            episodes = s.episodes or 0,
            down_for = s.down_since and (t - s.down_since) or nil,
            empty_for = s.empty_since and (t - s.empty_since) or nil,
            terminating = s.scratch and s.scratch.terminating,
            detail = u.owner and detail or nil,
        }
    end
    return out
end

-- text = discovery.prometheus(): the standby pools in Prometheus' text format (appended to the exporter's output);
-- "" when no upstream has one. The same in every worker (read from the shared peer set).
function _M.prometheus()
    local names = {}
    for name, u in pairs(ups) do
        if u.c.standby then
            names[#names + 1] = name
        end
    end
    if #names == 0 then
        return ""
    end
    sort(names)
    local out = { "# HELP autoscale_discovery_standby_peers Peers of the standby pool by state (active: in rotation, "
                  .. "draining: on the way out, standby: out of rotation).\n"
                  .. "# TYPE autoscale_discovery_standby_peers gauge\n" }
    for _, name in ipairs(names) do
        local sb = _M.state(name).standby
        local n = { active = sb.active, draining = sb.draining, standby = sb.size - sb.active - sb.draining }
        for _, state in ipairs { "active", "draining", "standby" } do
            out[#out + 1] = format("autoscale_discovery_standby_peers{upstream=\"%s\",state=\"%s\"} %d\n", name, state,
                                   n[state])
        end
    end
    return concat(out)
end

local function reply(status, body)
    ngx.status = status
    ngx.header["Content-Type"] = "application/json"
    ngx.header["Cache-Control"] = "no-store"
    ngx.say(cjson.encode(body))
end

-- autoscale.discovery_handler(), in content_by_lua*:
--   GET                                  the discovery state of every upstream (or ?upstream=name)
--   POST ?upstream=name&activate=n       discovery.activate(name, n)
--   POST ?upstream=name&deactivate=n     discovery.deactivate(name, n)
-- A POST needs the admin API's token and allow list (admin.authorize) and Content-Type: application/json (415
-- otherwise). Bad requests get 400/401/403/404/405/415 with {"error": reason} and change nothing.
function _M.handler()
    local args = ngx.req.get_uri_args(16)
    local method = ngx.req.get_method()
    local name = args.upstream
    if method == "GET" then
        if name then
            local st, err = _M.state(name)
            return reply(st and 200 or 404, redact.value(st or { error = err }))
        end
        local all = {}
        for n in pairs(ups) do
            all[n] = _M.state(n)
        end
        return reply(200, redact.value { upstreams = all })
    end
    if method ~= "POST" then
        ngx.header["Allow"] = "GET, POST"
        return reply(405, { error = "use GET (state) or POST (activate/deactivate)" })
    end
    -- A change: the admin API's allow list and bearer token, and a JSON content type.
    local admin = require "resty.autoscale.admin"
    local ok, code, reason, headers = admin.authorize()
    if ok then
        ok, code, reason = admin.json_request()
    end
    if not ok then
        for k, v in pairs(headers or {}) do
            ngx.header[k] = v
        end
        ngx.log(ngx.WARN, "resty.autoscale discovery: refused POST ", ngx.var.request_uri, " from ",
                ngx.var.remote_addr, ": ", code, " ", reason)
        return reply(code, { error = reason })
    end
    if type(name) ~= "string" then
        return reply(400, { error = "upstream: required" })
    end
    if not ups[name] or not ups[name].c.standby then
        local _, err = pool(name, 0)
        return reply(404, { error = err })
    end
    local verb = args.activate ~= nil and "activate" or args.deactivate ~= nil and "deactivate" or nil
    if not verb or (args.activate ~= nil and args.deactivate ~= nil) then
        return reply(400, { error = "give exactly one of activate=n or deactivate=n" })
    end
    local text = args[verb]
    local n = type(text) == "string" and text:match("^%d+$") and tonumber(text)
    if not n then
        return reply(400, { error = verb .. ": must be a whole number (got " .. show(text) .. ")" })
    end
    local done, list = _M[verb](name, n)
    if not done then
        return reply(400, { error = list })
    end
    return reply(200, { [verb .. "d"] = done, peers = list, state = _M.state(name) })
end

return _M
