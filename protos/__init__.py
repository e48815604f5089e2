"""embps wire contract: generated protobuf code plus the routing hash and array codec."""
