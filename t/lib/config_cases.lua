-- Used by t/016-config-check.t, in the init phase of a throwaway nginx: runs the init_by_lua_block code of a test
-- block's nginx.conf with autoscale.configure and autoscale.admin wrapped so that every call is recorded (its argument
-- as Lua source, and the error it raised, if any), then exits. The test then gives each recorded configuration to
-- bin/resty-autoscale-check and expects the same verdict and the same message.
--
--     require("config_cases").record(check_lua, conf_path, dir)
--
-- writes dir/rec_<n>.lua (`return conf[, admin]`), dir/rec_<n>.err (the error; absent when accepted) or
-- dir/rec_<n>.skip (why the call cannot be replayed), and dir/done.

local _M = {}

local function serialize(v, seen)
    local t = type(v)
    if t == "string" then
        return string.format("%q", v)
    elseif t == "number" then
        if v ~= v then
            return "0/0"
        elseif v == math.huge then
            return "math.huge"
        elseif v == -math.huge then
            return "-math.huge"
        end
        return string.format("%.17g", v)
    elseif t == "boolean" or t == "nil" then
        return tostring(v)
    elseif t == "table" then
        seen = seen or {}
        if seen[v] then
            error("a table that contains itself")
        end
        seen[v] = true
        local keys = {}
        for k in pairs(v) do
            keys[#keys + 1] = k
        end
        table.sort(keys, function(a, b)
            if type(a) == type(b) and (type(a) == "number" or type(a) == "string") then
                return a < b
            end
            return type(a) < type(b)
        end)
        local parts = {}
        for _, k in ipairs(keys) do
            parts[#parts + 1] = "[" .. serialize(k, seen) .. "] = " .. serialize(v[k], seen)
        end
        seen[v] = nil
        return "{ " .. table.concat(parts, ", ") .. " }"
    end
    error("a value of type " .. t)
end

local function write(path, text)
    local f = assert(io.open(path, "w"))
    f:write(text)
    f:close()
end

function _M.record(check_lua, conf_path, dir)
    local check = dofile(check_lua)
    local tree = assert(check.parse(conf_path, conf_path:match("^(.*)/")))
    local code
    for _, d in ipairs(tree) do
        if d.name == "http" then
            for _, x in ipairs(d.block) do
                if x.name == "init_by_lua_block" then
                    code = x.lua
                end
            end
        end
    end
    assert(code, "no init_by_lua_block")
    local autoscale = require "resty.autoscale"
    local configure, admin = autoscale.configure, autoscale.admin
    local n, last_conf = 0, nil
    local function rec(src, err, skip)
        n = n + 1
        if skip then
            write(dir .. "/rec_" .. n .. ".skip", skip)
            return
        end
        write(dir .. "/rec_" .. n .. ".lua", "return " .. src .. "\n")
        if err then
            write(dir .. "/rec_" .. n .. ".err", tostring(err))
        end
    end
    autoscale.configure = function(c)
        local ok_src, src = pcall(serialize, c)
        local ok, err = pcall(configure, c)
        if not ok_src then
            rec(nil, nil, "not replayable: " .. tostring(src))
        elseif n > 0 and last_conf ~= nil then
            rec(nil, nil, "a second configure in the same process")
        else
            rec(src, not ok and err or nil)
        end
        last_conf = ok and src or last_conf
        if not ok then
            error(err, 0)
        end
        return err
    end
    autoscale.admin = function(opts)
        local ok_src, src = pcall(serialize, opts)
        local ok, err = pcall(admin, opts)
        if not ok_src then
            rec(nil, nil, "not replayable: " .. tostring(src))
        elseif not last_conf then
            rec(nil, nil, "admin without a configuration")
        else
            rec(last_conf .. ", " .. src, not ok and err or nil)
        end
        if not ok then
            error(err, 0)
        end
        return err
    end
    local chunk = assert(loadstring(code, "=init_by_lua"))
    local ok, err = pcall(chunk)
    write(dir .. "/done", ok and "" or tostring(err))
    os.exit(0)
end

return _M
