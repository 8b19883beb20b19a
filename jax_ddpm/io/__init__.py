"""The file boundary: paths, summaries, images, and the errors of user input."""
