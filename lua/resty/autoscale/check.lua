-- resty.autoscale.check: the engine of `resty-autoscale-check` (bin/resty-autoscale-check).
--
-- It runs inside a throwaway nginx (`master_process off`, files in a scratch directory, no listening socket) in its
-- init phase, so the configuration goes through exactly what nginx start runs: autoscale.configure() and
-- autoscale.admin() of the library found along package.cpath/package.path. The process exits from the init phase (os.exit) before nginx opens
-- any listening socket, so nothing of a running nginx (its ports, its shared memory) is touched.
--
--     check.lua_file(path, out)             a Lua file returning conf[, admin]
--     check.extract(conf_path, prefix, dir) an nginx.conf: writes dir/http.conf and dir/init.lua for the second pass
--     check.run_init(dir, out)              the second pass: runs the init_by_lua* code of that nginx.conf
--
-- `out` is the path of the result file the shell script reads: one line per error, then "ok" or "failed".

local io_open = io.open
local concat = table.concat
local format = string.format
local pcall = pcall
local type = type

local _M = {}

local function finish(out, errors)
    local f = assert(io_open(out, "w"))
    for _, e in ipairs(errors) do
        f:write(e, "\n")
    end
    f:write(#errors == 0 and "ok\n" or "failed\n")
    f:close()
    os.exit(#errors == 0 and 0 or 1)
end

-- An error raised by configure/admin reads "<chunk>:<line>: resty.autoscale: <field>: <reason>", one line per error.
-- A position inside this file (the call of configure/admin for a Lua file) says nothing to the user: dropped.
local function add(errors, err)
    err = tostring(err)
    for line in err:gmatch("[^\n]+") do
        errors[#errors + 1] = (line:gsub("^[^\n]-resty/autoscale/check%.lua:%d+: ", ""))
    end
end

-- check.lua_file(path, out): the file returns the table given to autoscale.configure, and optionally the table given
-- to autoscale.admin.
function _M.lua_file(path, out)
    local errors = {}
    local chunk, err = loadfile(path)
    if not chunk then
        add(errors, err)
        return finish(out, errors)
    end
    local ok, conf, admin = pcall(chunk)
    if not ok then
        add(errors, path .. ": " .. tostring(conf))
        return finish(out, errors)
    end
    local autoscale = require "resty.autoscale"
    ok, err = pcall(autoscale.configure, conf)
    if not ok then
        add(errors, err)
    elseif admin ~= nil then
        ok, err = pcall(autoscale.admin, admin)
        if not ok then
            add(errors, err)
        end
    end
    return finish(out, errors)
end

-- nginx.conf reading -------------------------------------------------------------------------------------------

-- Tokens of an nginx configuration file, as nginx reads them: words, quoted strings (with nginx's escapes), ";",
-- "{", "}", comments dropped; after a *_by_lua_block name, the Lua code up to its closing brace is one token (Lua
-- strings, long brackets and comments taken into account, as lua-nginx-module does).
local function tokenize(text, file)
    local toks, i, n, line = {}, 1, #text, 1
    local function push(kind, value, l)
        toks[#toks + 1] = { kind = kind, value = value, line = l, file = file }
    end
    -- A quoted string from i (just after the quote) to its closing quote; with `unescape`, nginx's escapes applied.
    local function quoted(q, unescape)
        local buf = {}
        while i <= n do
            local d = text:sub(i, i)
            if d == "\\" then
                local e = text:sub(i + 1, i + 1)
                buf[#buf + 1] = not unescape and "" or (e == "n" and "\n") or (e == "t" and "\t")
                                or (e == "r" and "\r") or ((e == '"' or e == "'" or e == "\\") and e) or ("\\" .. e)
                i = i + 2
            elseif d == q then
                i = i + 1
                return concat(buf)
            else
                if d == "\n" then line = line + 1 end
                buf[#buf + 1] = d
                i = i + 1
            end
        end
        return nil
    end
    local function lua_block(start_line)
        -- i is just after "{"
        local depth, buf_start = 1, i
        while i <= n do
            local c = text:sub(i, i)
            if c == "\n" then
                line = line + 1
                i = i + 1
            elseif c == "-" and text:sub(i, i + 1) == "--" then
                local eq = text:match("^%[(=*)%[", i + 2)
                if eq then
                    local close = "]" .. eq .. "]"
                    local e = text:find(close, i, true)
                    e = e or n
                    for _ in text:sub(i, e):gmatch("\n") do line = line + 1 end
                    i = e + #close
                else
                    local e = text:find("\n", i, true) or n + 1
                    i = e
                end
            elseif c == "[" and text:match("^%[=*%[", i) then
                local eq = text:match("^%[(=*)%[", i)
                local close = "]" .. eq .. "]"
                local e = text:find(close, i, true) or n
                for _ in text:sub(i, e):gmatch("\n") do line = line + 1 end
                i = e + #close
            elseif c == '"' or c == "'" then
                i = i + 1
                quoted(c)
            elseif c == "{" then
                depth = depth + 1
                i = i + 1
            elseif c == "}" then
                depth = depth - 1
                if depth == 0 then
                    push("lua", text:sub(buf_start, i - 1), start_line)
                    i = i + 1
                    return true
                end
                i = i + 1
            else
                i = i + 1
            end
        end
        return nil, format("%s:%d: unterminated Lua block", file, start_line)
    end
    local expect_lua = false
    while i <= n do
        local c = text:sub(i, i)
        if c == "\n" then
            line = line + 1
            i = i + 1
        elseif c:find("%s") then
            i = i + 1
        elseif c == "#" then
            i = text:find("\n", i, true) or n + 1
        elseif c == ";" or c == "}" then
            push(c, c, line)
            i = i + 1
        elseif c == "{" then
            push(c, c, line)
            i = i + 1
            if expect_lua then
                expect_lua = false
                local ok, err = lua_block(line)
                if not ok then
                    return nil, err
                end
            end
        elseif c == '"' or c == "'" then
            local l = line
            i = i + 1
            local str = quoted(c, true)
            if not str then
                return nil, format("%s:%d: unterminated string", file, l)
            end
            push("word", str, l)
        else
            local s, e = text:find("^[^%s;{}\"'#]+", i)
            local w = text:sub(s, e)
            push("word", w, line)
            i = e + 1
            -- a directive name directly before "{"
            local prev = toks[#toks - 1]
            if w:find("_by_lua_block$") and (not prev or prev.kind == ";" or prev.kind == "{" or prev.kind == "}"
                                              or prev.kind == "lua") then
                expect_lua = true
            end
        end
    end
    return toks
end

local function read(path)
    local f, err = io_open(path, "rb")
    if not f then
        return nil, err
    end
    local s = f:read("*a")
    f:close()
    return s
end

local function dirname(path)
    return path:match("^(.*)/[^/]*$") or "."
end

local function shell_quote(s)
    return "'" .. s:gsub("'", "'\\''") .. "'"
end

-- The files an include pattern names, in the order nginx reads them (sorted, as glob() returns them).
local function glob(pattern)
    if not pattern:find("[%*%?%[]") then
        return { pattern }
    end
    -- quote everything except the glob characters
    local quoted = pattern:gsub("[^%*%?%[%]]+", shell_quote)
    local p = io.popen("for f in " .. quoted .. "; do [ -e \"$f\" ] && printf '%s\\n' \"$f\"; done")
    local out = {}
    for l in p:lines() do
        out[#out + 1] = l
    end
    p:close()
    table.sort(out)
    return out
end

-- Directives as a tree: { name, args = {...}, block = {...} | nil, lua = code | nil, file, line }, includes expanded.
local function parse(path, conf_prefix, depth)
    depth = depth or 0
    if depth > 16 then
        return nil, path .. ": includes nested too deeply"
    end
    local text, err = read(path)
    if not text then
        return nil, "cannot read " .. path .. ": " .. tostring(err)
    end
    local toks
    toks, err = tokenize(text, path)
    if not toks then
        return nil, err
    end
    local pos = 1
    local function block()
        local list = {}
        while true do
            local t = toks[pos]
            if not t then
                return list
            end
            if t.kind == "}" then
                pos = pos + 1
                return list, true
            end
            if t.kind ~= "word" then
                return nil, format("%s:%d: unexpected \"%s\"", t.file, t.line, t.value)
            end
            local d = { name = t.value, args = {}, file = t.file, line = t.line }
            pos = pos + 1
            while true do
                local a = toks[pos]
                if not a then
                    return nil, format("%s:%d: unexpected end of file", t.file, t.line)
                end
                pos = pos + 1
                if a.kind == "word" then
                    d.args[#d.args + 1] = a.value
                elseif a.kind == ";" then
                    break
                elseif a.kind == "{" then
                    if toks[pos] and toks[pos].kind == "lua" then
                        d.lua, d.lua_line = toks[pos].value, toks[pos].line
                        pos = pos + 1
                    else
                        local sub, e = block()
                        if not sub then
                            return nil, e
                        end
                        d.block = sub
                    end
                    break
                else
                    return nil, format("%s:%d: unexpected \"%s\"", a.file, a.line, a.value)
                end
            end
            if d.name == "include" and d.args[1] then
                local pattern = d.args[1]
                if pattern:sub(1, 1) ~= "/" then
                    pattern = conf_prefix .. "/" .. pattern
                end
                for _, f in ipairs(glob(pattern)) do
                    local inc, e = parse(f, conf_prefix, depth + 1)
                    if not inc then
                        return nil, e
                    end
                    for _, x in ipairs(inc) do
                        list[#list + 1] = x
                    end
                end
            else
                list[#list + 1] = d
            end
        end
    end
    local list, closed = block()
    if list and closed then
        return nil, path .. ": unexpected \"}\""
    end
    return list, closed
end
_M.parse = parse

local function ngx_quote(s)
    return '"' .. s:gsub('\\', '\\\\'):gsub('"', '\\"') .. '"'
end

-- check.extract(conf_path, prefix, dir, out): finds the http block's init_by_lua* code and the directives it depends
-- on (lua_package_path, lua_package_cpath, lua_shared_dict), writes them to dir/http.conf and the code to
-- dir/init.lua, and exits 0; or writes the reason to `out` and exits 2.
function _M.extract(conf_path, prefix, dir, out)
    local function fail(msg)
        local f = assert(io_open(out, "w"))
        f:write(msg, "\nunreadable\n")
        f:close()
        os.exit(2)
    end
    local tree, err = parse(conf_path, dirname(conf_path))
    if not tree then
        return fail(err)
    end
    local http
    for _, d in ipairs(tree) do
        if d.name == "http" and d.block then
            http = d.block
        end
    end
    if not http then
        return fail(conf_path .. ": no http block")
    end
    local lines, code, where = {}, nil, nil
    local function expand(s)
        s = s:gsub("%${prefix}", prefix):gsub("%$prefix", prefix)
        return s
    end
    for _, d in ipairs(http) do
        if d.name == "lua_package_path" or d.name == "lua_package_cpath" then
            lines[#lines + 1] = d.name .. " " .. ngx_quote(expand(d.args[1] or "")) .. ";"
        elseif d.name == "lua_shared_dict" then
            lines[#lines + 1] = "lua_shared_dict " .. ngx_quote(d.args[1] or "") .. " " .. ngx_quote(d.args[2] or "")
                                .. ";"
        elseif d.name == "init_by_lua_block" then
            code, where = d.lua or "", format("init_by_lua(%s:%d)", conf_path:match("[^/]*$"), d.lua_line or d.line)
        elseif d.name == "init_by_lua" then
            code, where = d.args[1] or "", format("init_by_lua(%s:%d)", conf_path:match("[^/]*$"), d.line)
        elseif d.name == "init_by_lua_file" then
            local p = d.args[1] or ""
            if p:sub(1, 1) ~= "/" then
                p = prefix .. "/" .. p
            end
            local text, e = read(p)
            if not text then
                return fail(format("%s:%d: init_by_lua_file: cannot read %s: %s", d.file, d.line, p, tostring(e)))
            end
            code, where = text, "@" .. p
        end
    end
    if not code then
        return fail(conf_path .. ": the http block has no init_by_lua_block, init_by_lua or init_by_lua_file")
    end
    local f = assert(io_open(dir .. "/http.conf", "w"))
    f:write(concat(lines, "\n"), "\n")
    f:close()
    f = assert(io_open(dir .. "/init.lua", "w"))
    f:write(code)
    f:close()
    f = assert(io_open(dir .. "/init.name", "w"))
    f:write(where)
    f:close()
    os.exit(0)
end

-- check.run_init(dir, out): runs dir/init.lua as nginx would run that init_by_lua* code.
function _M.run_init(dir, out)
    local errors = {}
    local code = assert(read(dir .. "/init.lua"))
    local name = assert(read(dir .. "/init.name"))
    local chunk, err = loadstring(code, name:sub(1, 1) == "@" and name or "=" .. name)
    if not chunk then
        add(errors, err)
        return finish(out, errors)
    end
    local ok
    ok, err = pcall(chunk)
    if not ok then
        add(errors, err)
    end
    return finish(out, errors)
end

return _M
