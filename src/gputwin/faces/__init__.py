"""What the user touches: the CLI, the terminal UI and its widgets, headless mode, status, report, browser view."""
