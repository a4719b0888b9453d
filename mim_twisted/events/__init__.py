"""Events for the world outside the server: what users do, told to a message broker."""
