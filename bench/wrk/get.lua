-- GET <path prefix><id> with the service's headers: a unique X-Request-ID per request
-- and the caller's X-API-Key. Arguments (after --): api_key, comma-separated ids,
-- path prefix (e.g. /payments/), request-id prefix.
-- The ceiling run uses the same script with one "id" and the trivial route as prefix,
-- so both sides send the same headers.
local script_dir = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
dofile(script_dir .. "report.lua")

local threads = {}
local counter = 0
local api_key, prefix, rid_prefix
local ids = {}

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  api_key = args[1]
  for id in string.gmatch(args[2], "[^,]+") do
    table.insert(ids, id)
  end
  prefix = args[3]
  rid_prefix = args[4] .. "-" .. tostring(tid) .. "-"
end

function request()
  counter = counter + 1
  local id = ids[(counter % #ids) + 1]
  return wrk.format("GET", prefix .. id, {
    ["X-Request-ID"] = rid_prefix .. counter,
    ["X-API-Key"] = api_key,
  })
end
