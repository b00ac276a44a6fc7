"""Page data machinery a first read can skip: image I/O and the folder walk, synthetic demo pages, the §5
pair selection, page shards with their filter pass and stream, and encoder passes and caches."""
