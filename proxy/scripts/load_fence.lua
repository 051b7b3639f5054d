-- Before a read-through loads an entity (a thread with its messages, or a state key) from
-- PostgreSQL: register the load's token in the entity's fence, a set. A fill (or a write based
-- on the load) must find its token still there; release.lua deletes the set whenever it
-- releases the entity, so a load that began before a newer version was flushed (and could
-- expire) can never install what it read. The loader removes its token when done (SREM).
-- KEYS: fence ; ARGV: token, lifetime of the set in ms (a fill after that is refused)
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
