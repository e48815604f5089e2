"""embps trainer-side client."""
