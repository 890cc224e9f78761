"""Local processes: the embedded model server, verified downloads, helper servers started and stopped."""
