-- POST /v1/checkout/sessions straight to the Stripe emulator, with the parameters the
-- service sends (form-encoded, Bearer key, a unique Idempotency-Key): the cost of the
-- dependency alone, the ceiling of the service's POST /payments.
-- Arguments (after --): secret key, idempotency-key prefix (unique per run).
local script_dir = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
dofile(script_dir .. "report.lua")

local threads = {}
local counter = 0
local secret, key_prefix

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  secret = args[1]
  key_prefix = args[2] .. "-" .. tostring(tid) .. "-"
end

local template = "mode=payment" ..
  "&line_items[0][price_data][currency]=eur" ..
  "&line_items[0][price_data][unit_amount]=2500" ..
  "&line_items[0][price_data][product_data][name]=order-%s" ..
  "&line_items[0][quantity]=1" ..
  "&client_reference_id=%s" ..
  "&metadata[request_id]=%s&metadata[callback_hash]=%s&metadata[order_ref]=bench" ..
  "&payment_intent_data[metadata][request_id]=%s" ..
  "&success_url=http%%3A%%2F%%2F127.0.0.1%%2Fcb%%3Fstate%%3Dsuccess" ..
  "&cancel_url=http%%3A%%2F%%2F127.0.0.1%%2Fcb%%3Fstate%%3Dcancel"

function request()
  counter = counter + 1
  local key = key_prefix .. counter
  local body = string.format(template, key, key, key, key, key)
  return wrk.format("POST", "/v1/checkout/sessions", {
    ["Authorization"] = "Bearer " .. secret,
    ["Idempotency-Key"] = key,
    ["Content-Type"] = "application/x-www-form-urlencoded",
  }, body)
end
