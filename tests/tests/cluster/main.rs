//! End-to-end cluster tests: real `tessera` processes on 127.0.0.1, real gRPC, real etcd
//! where the test is about etcd.

mod abandoned;
mod adapters;
mod api_keys;
mod autoscale;
mod beams;
mod chaos;
mod decoding;
mod deployment;
mod encoders;
mod etcd_cluster;
mod etcd_security;
mod failover;
mod failures;
mod http_client;
mod local_cluster;
mod long_context;
mod long_input;
mod migration;
mod netns;
mod openai_http;
mod openai_sdk;
mod partition;
mod real_models;
mod restarts;
mod serving;
mod support;
mod tls;
mod tls_client;
