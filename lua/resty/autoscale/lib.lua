-- Loads libresty_autoscale through LuaJIT's FFI.
--
-- The library is looked up along package.cpath (as `libresty_autoscale.so` and `resty_autoscale.so` for every `?`
-- template), or taken from an explicit path; when it cannot be found the error lists every path tried.

local ffi = require "ffi"
local cdef = require "resty.autoscale.cdef"

local io_open = io.open
local concat = table.concat
local pcall = pcall
local gsub = string.gsub
local gmatch = string.gmatch

ffi.cdef(cdef)

local _M = {}

local NAMES = { "libresty_autoscale", "resty_autoscale" }

local function readable(path)
    local f = io_open(path, "rb")
    if f then
        f:close()
        return true
    end
    return false
end

-- lib, err = lib.load(path?)
function _M.load(path)
    local tried = {}
    local candidates = {}
    if path then
        candidates[1] = path
    else
        for template in gmatch(package.cpath, "[^;]+") do
            for _, name in ipairs(NAMES) do
                candidates[#candidates + 1] = (gsub(template, "%?", name))
            end
        end
    end
    for _, p in ipairs(candidates) do
        if readable(p) then
            local ok, lib = pcall(ffi.load, p)
            if ok then
                local want = lib.AUTOSCALE_ABI_VERSION
                local have = lib.autoscale_abi_version()
                if have ~= want then
                    tried[#tried + 1] = p .. " (ABI version " .. have .. ", this Lua code needs " .. want .. ")"
                else
                    return lib, p
                end
            else
                tried[#tried + 1] = p .. " (" .. tostring(lib) .. ")"
            end
        else
            tried[#tried + 1] = p .. " (not found)"
        end
    end
    return nil, "cannot load libresty_autoscale.so; tried:\n    " .. concat(tried, "\n    ")
end

return _M
