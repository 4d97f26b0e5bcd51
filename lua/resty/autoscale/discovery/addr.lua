-- Peer addresses as the library prints them ("127.0.0.1:80", "[2001:db8::1]:80", IPv6 in RFC 5952 form), so that
-- an address from a discovery source compares equal to the same peer already in the upstream.

local type = type
local ipairs = ipairs
local tonumber = tonumber
local format = string.format
local concat = table.concat

local _M = {}

local function ipv4(s)
    local a, b, c, d = s:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
    if not a then
        return nil
    end
    for _, x in ipairs { a, b, c, d } do
        if #x > 3 or tonumber(x) > 255 or (#x > 1 and x:sub(1, 1) == "0") then
            return nil
        end
    end
    return s
end

-- RFC 5952: lower case, no leading zeros, the longest run (first on a tie) of two or more zero groups as "::".
local function ipv6(s)
    if type(s) ~= "string" or #s > 45 or s:find("[^%x:]") then
        return nil
    end
    local head, tail = s, nil
    local gap = s:find("::", 1, true)
    if gap then
        head, tail = s:sub(1, gap - 1), s:sub(gap + 2)
        if tail:find("::", 1, true) then
            return nil
        end
    end
    local groups = {}
    local function take(part)
        if part == "" then
            return true
        end
        for g in (part .. ":"):gmatch("([^:]*):") do
            if #g == 0 or #g > 4 then
                return false
            end
            groups[#groups + 1] = tonumber(g, 16)
        end
        return true
    end
    if not take(head) then
        return nil
    end
    local nhead = #groups
    if not take(tail or "") then
        return nil
    end
    if gap then
        local missing = 8 - #groups
        if missing < 1 then
            return nil
        end
        for _ = 1, missing do
            table.insert(groups, nhead + 1, 0)
        end
    elseif #groups ~= 8 then
        return nil
    end
    local best, best_len, i = nil, 1, 1
    while i <= 8 do
        if groups[i] == 0 then
            local j = i
            while j < 8 and groups[j + 1] == 0 do
                j = j + 1
            end
            if j - i + 1 > best_len then
                best, best_len = i, j - i + 1
            end
            i = j + 1
        else
            i = i + 1
        end
    end
    local parts = {}
    for k = 1, 8 do
        parts[k] = format("%x", groups[k])
    end
    if not best then
        return concat(parts, ":")
    end
    return concat(parts, ":", 1, best - 1) .. "::" .. (best + best_len <= 8 and concat(parts, ":", best + best_len, 8) or "")
end

-- text = addr.join(ip, port): nil when `ip` is not an IP address or `port` not a port.
function _M.join(ip, port)
    port = tonumber(port)
    if not port or port < 1 or port > 65535 or port % 1 ~= 0 then
        return nil
    end
    if type(ip) ~= "string" then
        return nil
    end
    local v4 = ipv4(ip)
    if v4 then
        return v4 .. ":" .. port
    end
    local v6 = ipv6(ip)
    return v6 and ("[" .. v6 .. "]:" .. port)
end

-- text = addr.canonical(text): "ip:port" or "[ipv6]:port" in the library's form, or nil when it is neither.
function _M.canonical(text)
    if type(text) ~= "string" then
        return nil
    end
    local host, port = text:match("^%[([^%]]*)%]:(%d+)$")
    if host then
        local v6 = ipv6(host)
        return v6 and _M.join(v6, port)
    end
    host, port = text:match("^([%d%.]+):(%d+)$")
    return host and _M.join(host, port)
end

-- The address of a peer written as in `peers` ("ip:port" or { addr = , weight = }), or nil.
function _M.of(p)
    if type(p) == "table" then
        p = p.addr
    end
    return _M.canonical(p)
end

return _M
