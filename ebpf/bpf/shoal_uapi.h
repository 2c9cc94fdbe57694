/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The slice of the kernel's BPF UAPI (include/uapi/linux/bpf.h) that shoal.bpf.c uses.
 *
 * Spelled out here instead of including <linux/bpf.h> so that the committed object depends on
 * clang alone: the context structs end up in the object's BTF, and a newer linux-libc-dev that
 * appends fields to them would change the bytes without changing the program. Each value below
 * is stable kernel ABI; the context structs stop after the last field the programs read (the
 * verifier checks offsets, and the kernel matches context types by name only).
 */
#ifndef SHOAL_UAPI_H
#define SHOAL_UAPI_H

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef signed char __s8;
typedef short __s16;
typedef int __s32;
typedef long long __s64;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u32 __wsum;

/* enum bpf_map_type */
#define BPF_MAP_TYPE_HASH 1
#define BPF_MAP_TYPE_ARRAY 2
#define BPF_MAP_TYPE_PERCPU_HASH 5
#define BPF_MAP_TYPE_SOCKHASH 18

/* map update flags */
#define BPF_ANY 0
#define BPF_NOEXIST 1

/* redirect flags */
#define BPF_F_INGRESS 1

/* enum sk_action */
#define SK_DROP 0
#define SK_PASS 1

/* sock_ops callbacks (enum, in order since 4.13) */
#define BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB 4
#define BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB 5

#define AF_INET 2

/* __bpf_md_ptr: a pointer the kernel rewrites, 8 bytes on every architecture. */
#define SHOAL_MD_PTR(type, name) \
	union {                  \
		type name;       \
		__u64 : 64;      \
	} __attribute__((aligned(8)))

/* Context of BPF_PROG_TYPE_SK_MSG (fields through `size`, kernel 5.0+). */
struct sk_msg_md {
	SHOAL_MD_PTR(void *, data);
	SHOAL_MD_PTR(void *, data_end);
	__u32 family;
	__u32 remote_ip4; /* network byte order */
	__u32 local_ip4; /* network byte order */
	__u32 remote_ip6[4];
	__u32 local_ip6[4];
	__u32 remote_port; /* network byte order, as a 32-bit big-endian value */
	__u32 local_port; /* host byte order */
	__u32 size; /* total bytes of this sendmsg */
};

/* Context of BPF_PROG_TYPE_SOCK_OPS (fields through `local_port`). */
struct bpf_sock_ops {
	__u32 op;
	union {
		__u32 args[4];
		__u32 reply;
		__u32 replylong[4];
	};
	__u32 family;
	__u32 remote_ip4; /* network byte order */
	__u32 local_ip4; /* network byte order */
	__u32 remote_ip6[4];
	__u32 local_ip6[4];
	__u32 remote_port; /* network byte order, as a 32-bit big-endian value */
	__u32 local_port; /* host byte order */
};

#endif /* SHOAL_UAPI_H */
