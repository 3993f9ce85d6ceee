"""Authentication, source policy, network checks and redaction."""
