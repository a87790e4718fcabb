"""The worker's roles: aggregate (per source partition), finalize (per agent) and forward
(per sampled partition), and their wiring to Kafka."""
