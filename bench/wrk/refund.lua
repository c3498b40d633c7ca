-- POST <prefix><id><suffix>: a 1-cent refund per request, cycling over ids, a unique
-- request id each (so each is a new refund and a Stripe call). Arguments (after --):
-- api_key, comma-separated ids, path prefix, path suffix, request-id prefix.
-- Service: /payments/<payment id>/refunds with the JSON body and the service's headers.
-- Ceiling (api_key "stripe:<secret>"): /v1/refunds at the emulator, form-encoded with
-- the parameters the service sends, each id a PaymentIntent.
local script_dir = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
dofile(script_dir .. "report.lua")

local threads = {}
local counter = 0
local api_key, prefix, suffix, rid_prefix, offset
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
  suffix = args[4]
  rid_prefix = args[5] .. "-" .. tostring(tid) .. "-"
  -- threads start apart in the id list, so they do not queue on one payment's lock
  offset = (tid - 1) * 7919
end

function request()
  counter = counter + 1
  local id = ids[((counter + offset) % #ids) + 1]
  local rid = rid_prefix .. counter
  if string.sub(api_key, 1, 7) == "stripe:" then
    local body = "payment_intent=" .. id .. "&amount=1" ..
      "&metadata[request_id]=" .. rid .. "&metadata[refund_id]=" .. counter
    return wrk.format("POST", prefix .. suffix, {
      ["Authorization"] = "Bearer " .. string.sub(api_key, 8),
      ["Idempotency-Key"] = rid,
      ["Content-Type"] = "application/x-www-form-urlencoded",
    }, body)
  end
  local body = '{"request_id":"' .. rid .. '","amount_cents":1}'
  return wrk.format("POST", prefix .. id .. suffix, {
    ["X-Request-ID"] = rid,
    ["X-API-Key"] = api_key,
    ["Content-Type"] = "application/json",
  }, body)
end
