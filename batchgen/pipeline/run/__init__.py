"""The run loop and what surrounds it: engine set-up, stopping, the summary, the dry run."""
