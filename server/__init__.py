"""embps storage engine and shard service."""
