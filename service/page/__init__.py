"""The web page front door: ``GET /`` draws the masks over a local image with the /segment door's answers."""
