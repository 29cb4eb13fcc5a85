"""Registry: registering models (write side), reading them back (read side), the gate, export."""
