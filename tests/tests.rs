//! settlegate's integration tests: one binary, one module per area (as ripgrep does).

mod support;

mod cli_config;
mod cluster;
mod cluster_nats;
mod deploy;
mod engine_accounts;
mod engine_age;
mod engine_codes;
mod engine_completions;
mod engine_durability;
mod engine_iso;
mod engine_lifecycle;
mod engine_model;
mod engine_money;
mod engine_providers;
mod engine_reconcile;
mod engine_settlement;
mod engine_wallet;
mod server_crash;
mod server_durability;
mod server_hardening;
mod server_lifecycle;
mod server_malformed;
mod server_metrics;
mod server_money;
mod server_ops;
mod server_readiness;
mod server_refunds;
mod server_replay;
mod server_report;
mod server_review;
