-- get: the record (see read_record), or nil. Changes nothing.
return read_record(now_ms())
