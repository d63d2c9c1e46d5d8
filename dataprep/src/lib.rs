//! twinhead dataprep: public corpora in, filtered, tokenized, mixed and
//! packed parquet shards out, byte-for-byte reproducible from a config.
