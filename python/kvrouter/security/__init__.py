"""Security of kvrouter's listeners, channels and event plane (docs/security.md):
`tls` (TLS and mutual TLS from one set of files per process), `channels` (clients' gRPC
channels with TLS and a bearer token), `auth` (principals, roles and the gRPC access
interceptor), `listeners` (the secure-default rule for listen addresses), `metrics`."""
