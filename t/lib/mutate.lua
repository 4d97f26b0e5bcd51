-- Random and mutated inputs for the property tests of the parsers that read network answers (t/060-properties.t):
-- values of every JSON type, structural mutations of a valid answer (a field removed, replaced by another type, a
-- list emptied or made huge, nesting), and byte mutations of its text (flips, cuts, insertions, repeats). Seeded:
-- a failure names its seed and iteration, and the same seed gives the same inputs.

local cjson = require "cjson.safe"

local random = math.random
local char = string.char
local concat = table.concat

local _M = {}

function _M.seed(s)
    math.randomseed(s)
end

local TOKENS = { "{", "}", "[", "]", '"', ",", ":", "null", "true", "false", "0", "-1", "1e999", "-0", "1.5",
                 '"\\u0000"', '"\\ud800"', "\\", "\n", " ", "\0", "\255", "[[[[[[[[", '{"a":', "9007199254740993" }

-- Random bytes, `n` at most.
function _M.bytes(n)
    local t = {}
    for i = 1, random(0, n or 64) do
        t[i] = char(random(0, 255))
    end
    return concat(t)
end

-- A random value of any JSON type (and a few that only Lua has); `depth` bounds nesting.
function _M.value(depth)
    depth = depth or 2
    local k = random(1, depth > 0 and 12 or 9)
    if k == 1 then return cjson.null
    elseif k == 2 then return random() < 0.5
    elseif k == 3 then return random(-5, 70000)
    elseif k == 4 then return ({ 0, -0.0, 1 / 0, -1 / 0, 2 ^ 53 + 1, 1e308, -1e-308, 0.5, 10001, 65536 })[random(1, 10)]
    elseif k == 5 then return _M.bytes(12)
    elseif k == 6 then return ({ "", "127.0.0.1:80", "[::1]:80", "1.2.3.4", "::1", "a.b.", "0", "-1", "NaN", "inf",
                                 "127.0.0.1:0", "999.1.1.1:1", "[::1]", "x:y", "1e3" })[random(1, 15)]
    elseif k == 7 then return tostring(random(0, 100000))
    elseif k == 8 then return random(0, 1) * 1000 + random()
    elseif k == 9 then return string.rep("a", random(0, 300))
    elseif k == 10 or k == 11 then
        local t = {}
        for i = 1, random(0, 4) do t[i] = _M.value(depth - 1) end
        return t
    else
        local t = {}
        for _ = 1, random(0, 4) do t[_M.bytes(6)] = _M.value(depth - 1) end
        return t
    end
end

local function copy(v)
    if type(v) ~= "table" then return v end
    local t = {}
    for k, x in pairs(v) do t[k] = copy(x) end
    return setmetatable(t, getmetatable(v))
end

-- A copy of table `v` with one to three structural mutations somewhere in it.
function _M.shape(v)
    v = copy(v)
    for _ = 1, random(1, 3) do
        -- walk down to a random node
        local node, depth = v, 0
        while type(node) == "table" and depth < 6 do
            local keys = {}
            for k in pairs(node) do keys[#keys + 1] = k end
            if #keys == 0 or random() < 0.3 then break end
            local k = keys[random(1, #keys)]
            if type(node[k]) ~= "table" or random() < 0.4 then
                local m = random(1, 5)
                if m == 1 then node[k] = nil
                elseif m == 2 then node[k] = _M.value(2)
                elseif m == 3 then node[k] = { node[k] }
                elseif m == 4 then node[_M.value(0)] = node[k]
                else
                    local big = {}
                    for i = 1, random(0, 200) do big[i] = copy(node[k]) end
                    node[k] = big
                end
                break
            end
            node, depth = node[k], depth + 1
        end
    end
    return v
end

-- `text` with one to four byte mutations.
function _M.text(text)
    for _ = 1, random(1, 4) do
        local n = #text
        local i = random(1, n + 1)
        local m = random(1, 6)
        if m == 1 and n > 0 then text = text:sub(1, i - 1) .. char(random(0, 255)) .. text:sub(i + 1)
        elseif m == 2 then text = text:sub(1, i - 1) .. TOKENS[random(1, #TOKENS)] .. text:sub(i)
        elseif m == 3 then text = text:sub(1, i - 1) .. text:sub(i + random(1, 16))
        elseif m == 4 then text = text:sub(1, i)
        elseif m == 5 then text = text:sub(1, i) .. text:sub(i - random(0, 20), i):rep(random(1, 50)) .. text:sub(i + 1)
        else text = text:sub(1, i - 1) .. _M.bytes(8) .. text:sub(i)
        end
    end
    return text
end

-- An input derived from valid answer `v` (a table): the answer mutated in shape, its JSON text mutated, or bytes.
function _M.answer(v)
    local k = random(1, 10)
    if k <= 5 then
        return cjson.encode(_M.shape(v)) or "{}"
    elseif k <= 9 then
        return _M.text(cjson.encode(v))
    end
    return _M.bytes(200)
end

_M.copy = copy

return _M
