"""People talk to their model here: the web chat served at `/` and the terminal chat `ochat chat`."""
