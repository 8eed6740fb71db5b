-- A debounce repeat waiting to join (policyroute/steps/rate_limit.py): the first request's
-- record, {state, owner, code, headers, body}; state '1' once its response is stored.
return redis.call('HMGET', KEYS[1], 'st', 'tok', 'code', 'hd', 'bd')
