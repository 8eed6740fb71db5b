-- A stampede waiter's look at a cache entry: the stored response ('E...'), the lock of
-- the request computing it ('L<token>'), or nothing (the lock went: run the handler).
return redis.call('GET', KEYS[1])
