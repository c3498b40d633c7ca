-- POST /payments: a one-time hosted-card create with a unique request id per request
-- (so every request is a new payment and a Stripe call). Arguments (after --):
-- api_key, status_callback_url, request-id prefix (unique per run).
local script_dir = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
dofile(script_dir .. "report.lua")

local threads = {}
local counter = 0
local api_key, callback_url, rid_prefix

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  api_key = args[1]
  callback_url = args[2]
  rid_prefix = args[3] .. "-" .. tostring(tid) .. "-"
end

local template = '{"request_id":"%s","caller_service":"orders","resource_type":"order",' ..
  '"resource_id":"%s","customer_ref":"cus-bench","amount_cents":2500,"currency":"eur",' ..
  '"payment_method":1,"payment_type":1,"status_callback_url":"%s",' ..
  '"metadata":{"order_ref":"bench"}}'

function request()
  counter = counter + 1
  local rid = rid_prefix .. counter
  local body = string.format(template, rid, rid, callback_url)
  return wrk.format("POST", "/payments", {
    ["X-Request-ID"] = rid,
    ["X-API-Key"] = api_key,
    ["Content-Type"] = "application/json",
  }, body)
end
