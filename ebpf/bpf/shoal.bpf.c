// SPDX-License-Identifier: Apache-2.0
/*
 * Shoal's eBPF sidecar: the descriptor fast path between a node's gateway and its function
 * hosts (DESIGN.md §7).
 *
 * - `shoal_sock_ops` (cgroup v2 sock_ops): when an IPv4 TCP connection to or from one of the
 *   gateway's descriptor ports reaches ESTABLISHED, insert the socket into `shoal_socks`, a
 *   SOCKHASH keyed by the socket's own 4-tuple.
 * - `shoal_sk_msg` (SK_MSG verdict on `shoal_socks`): for each sendmsg on such a socket, count it
 *   for the connection's function and, if the connection is registered and redirect is on, move
 *   the bytes straight into the peer socket's receive queue (bpf_msg_redirect_hash with
 *   BPF_F_INGRESS), skipping TCP/IP. Anything else returns SK_PASS: the normal TCP path.
 *
 * Keys: `struct shoal_sock_key` is the 4-tuple as the *sending* socket sees it, every field in
 * network byte order, so its 12 bytes are sip, dip, sport, dport exactly as on the wire. The peer
 * of a socket has the swapped key.
 *
 * Byte order is preserved across the kill switch: a connection direction that has once gone
 * through TCP never redirects again (`pass_pinned`), because redirected bytes are read before
 * bytes still queued in TCP. Redirect also needs user space to register the connection, which it
 * does while the connection is quiet (see the crate documentation).
 */
#include "shoal_uapi.h"

#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

/* Limits; user space may not exceed them (the maps are full otherwise). */
#define SHOAL_MAX_SOCKETS 65536
#define SHOAL_MAX_CONNECTIONS 65536
#define SHOAL_MAX_FUNCTIONS 4096
#define SHOAL_MAX_PORTS 64

/* Function id under which messages of unregistered descriptor connections are counted. */
#define SHOAL_UNREGISTERED 0

/* Indexes of `shoal_config`. */
#define SHOAL_CONFIG_REDIRECT 0
#define SHOAL_CONFIG_LEN 1

/* Directions, the index into `struct shoal_fn_counters.dir`. */
#define SHOAL_TO_HOST 0 /* sent by the gateway (local port is a descriptor port) */
#define SHOAL_TO_GATEWAY 1 /* sent by a function host (remote port is a descriptor port) */

struct shoal_sock_key {
	__u32 sip; /* sender's address */
	__u32 dip; /* receiver's address */
	__u16 sport; /* sender's port */
	__u16 dport; /* receiver's port */
};

/* Value of `shoal_connections`; user space writes it for both keys of a connection. */
struct shoal_conn {
	__u64 function_id;
	__u32 pass_pinned; /* set by the program, never cleared: this direction went through TCP */
	__u32 reserved;
};

struct shoal_dir_counters {
	__u64 msgs; /* sendmsg calls seen */
	__u64 bytes; /* their bytes */
	__u64 redirected; /* of msgs, moved into the peer socket */
	__u64 passed; /* of msgs, left to TCP */
};

struct shoal_fn_counters {
	struct shoal_dir_counters dir[2];
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, SHOAL_MAX_SOCKETS);
	__type(key, struct shoal_sock_key);
	__type(value, __u32); /* a socket fd from user space; aya expects 4 bytes */
} shoal_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SHOAL_MAX_CONNECTIONS);
	__type(key, struct shoal_sock_key);
	__type(value, struct shoal_conn);
} shoal_connections SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, SHOAL_MAX_FUNCTIONS);
	__type(key, __u64);
	__type(value, struct shoal_fn_counters);
} shoal_counters SEC(".maps");

/* Descriptor listen ports of this sidecar's gateway, host byte order -> 1. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SHOAL_MAX_PORTS);
	__type(key, __u32);
	__type(value, __u32);
} shoal_ports SEC(".maps");

/* shoal_config[SHOAL_CONFIG_REDIRECT]: 1 to redirect, 0 (the initial value) to pass. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SHOAL_CONFIG_LEN);
	__type(key, __u32);
	__type(value, __u32);
} shoal_config SEC(".maps");

static __always_inline int is_descriptor_port(__u32 port_host_order)
{
	return bpf_map_lookup_elem(&shoal_ports, &port_host_order) != NULL;
}

/* remote_port holds the port as a 32-bit big-endian value on every architecture. */
static __always_inline __u16 remote_port_host(__u32 remote_port)
{
	return (__u16)bpf_ntohl(remote_port);
}

SEC("sockops")
int shoal_sock_ops(struct bpf_sock_ops *ops)
{
	__u32 op = ops->op;
	if (op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	if (ops->family != AF_INET)
		return 1;
	__u16 local = (__u16)ops->local_port;
	__u16 remote = remote_port_host(ops->remote_port);
	if (!is_descriptor_port(local) && !is_descriptor_port(remote))
		return 1;
	struct shoal_sock_key key = {
		.sip = ops->local_ip4,
		.dip = ops->remote_ip4,
		.sport = bpf_htons(local),
		.dport = bpf_htons(remote),
	};
	/* Fails only when the map is full; the socket then simply stays on TCP. */
	bpf_sock_hash_update(ops, &shoal_socks, &key, BPF_ANY);
	return 1;
}

static __always_inline struct shoal_dir_counters *counters_of(__u64 function_id, __u32 dir)
{
	struct shoal_fn_counters *c = bpf_map_lookup_elem(&shoal_counters, &function_id);
	if (!c) {
		struct shoal_fn_counters zero = {};
		bpf_map_update_elem(&shoal_counters, &function_id, &zero, BPF_NOEXIST);
		c = bpf_map_lookup_elem(&shoal_counters, &function_id);
		if (!c)
			return NULL; /* map full: this message goes uncounted */
	}
	return dir == SHOAL_TO_HOST ? &c->dir[SHOAL_TO_HOST] : &c->dir[SHOAL_TO_GATEWAY];
}

static __always_inline int redirect_enabled(void)
{
	__u32 index = SHOAL_CONFIG_REDIRECT;
	__u32 *flag = bpf_map_lookup_elem(&shoal_config, &index);
	return flag && *flag;
}

SEC("sk_msg")
int shoal_sk_msg(struct sk_msg_md *msg)
{
	__u16 local = (__u16)msg->local_port;
	__u16 remote = remote_port_host(msg->remote_port);
	struct shoal_sock_key key = {
		.sip = msg->local_ip4,
		.dip = msg->remote_ip4,
		.sport = bpf_htons(local),
		.dport = bpf_htons(remote),
	};
	__u64 size = msg->size;
	__u32 dir = is_descriptor_port(local) ? SHOAL_TO_HOST : SHOAL_TO_GATEWAY;
	struct shoal_conn *conn = bpf_map_lookup_elem(&shoal_connections, &key);
	__u64 function_id = conn ? conn->function_id : SHOAL_UNREGISTERED;

	int redirected = 0;
	if (conn && !conn->pass_pinned && redirect_enabled()) {
		struct shoal_sock_key peer = {
			.sip = key.dip,
			.dip = key.sip,
			.sport = key.dport,
			.dport = key.sport,
		};
		/* SK_DROP here means the peer is not in the map: fall back to TCP. */
		redirected = bpf_msg_redirect_hash(msg, &shoal_socks, &peer, BPF_F_INGRESS) == SK_PASS;
	}
	if (conn && !redirected)
		conn->pass_pinned = 1;

	struct shoal_dir_counters *c = counters_of(function_id, dir);
	if (c) {
		__sync_fetch_and_add(&c->msgs, 1);
		__sync_fetch_and_add(&c->bytes, size);
		if (redirected)
			__sync_fetch_and_add(&c->redirected, 1);
		else
			__sync_fetch_and_add(&c->passed, 1);
	}
	return SK_PASS;
}

/* No GPL-only helper is used. */
char LICENSE[] SEC("license") = "Apache-2.0";
