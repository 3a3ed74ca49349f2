/*
 * Lightervisor guest /init (PID 1): freestanding, no libc, no fork.
 *
 * On kvm-pvm hosts every fork costs about a second and every system call is a
 * page fault plus emulated kernel code, so this does the minimum with direct
 * system calls:
 *
 *   mount proc on /proc, sysfs on /sys, devtmpfs on /dev, devpts on /dev/pts,
 *   cgroup2 on /sys/fs/cgroup (pure cgroup v2, nsdelegate);
 *   print "LTV-READY" on the console;
 *   then act on `ltv.init=` from /proc/cmdline:
 *     ltv.init=poweroff -> end the VM: reboot(RESTART).  A microVM has no power-off
 *                          device (no ACPI), so the kernel's power-off only halts;
 *                          a reset is how a guest ends (as in Firecracker): with
 *                          reboot=k the kernel writes 0xFE to port 0x64 and the VMM
 *                          (or QEMU -no-reboot with an i8042) exits.
 *     ltv.init=reboot   -> the same
 *     ltv.init=halt     -> reboot(POWER_OFF): the kernel halts, the VMM keeps running
 *     ltv.init=/path    -> execve(/path)
 *     (absent)          -> execve(/bin/sh)    (busybox ash on the console)
 *   If the exec fails it says so and restarts the VM (PID 1 must not exit).
 *
 * Build: gcc -Os -static -nostdlib -ffreestanding -fno-stack-protector -fno-pie -no-pie -s
 */
typedef unsigned long u64;

#define SYS_read 0
#define SYS_write 1
#define SYS_open 2
#define SYS_close 3
#define SYS_execve 59
#define SYS_mkdir 83
#define SYS_mount 165
#define SYS_reboot 169

#define MS_NOSUID 2
#define MS_NODEV 4
#define MS_NOEXEC 8

static long sys6(long n, long a, long b, long c, long d, long e, long f)
{
	long ret;
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	register long r9 __asm__("r9") = f;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	return ret;
}
#define sys3(n, a, b, c) sys6(n, (long)(a), (long)(b), (long)(c), 0, 0, 0)

static u64 len(const char *s)
{
	u64 n = 0;
	while (s[n])
		n++;
	return n;
}

static void say(const char *a, const char *b)
{
	sys3(SYS_write, 1, a, len(a));
	if (b)
		sys3(SYS_write, 1, b, len(b));
	sys3(SYS_write, 1, "\n", 1);
}

static void mnt(const char *src, const char *dst, const char *type, long flags, const char *opts)
{
	long r = sys6(SYS_mount, (long)src, (long)dst, (long)type, flags, (long)opts, 0);
	if (r < 0)
		say("init: mount failed: ", dst);
}

static void do_reboot(long cmd)
{
	sys6(SYS_reboot, 0xfee1dead, 672274793, cmd, 0, 0, 0);
}

static int prefix(const char *s, const char *p)
{
	while (*p)
		if (*s++ != *p++)
			return 0;
	return 1;
}

static char cmdline[4096];

void __attribute__((noreturn, used)) init_main(void)
{
	const long nosuid_nodev_noexec = MS_NOSUID | MS_NODEV | MS_NOEXEC;
	char *mode = 0;

	mnt("proc", "/proc", "proc", nosuid_nodev_noexec, 0);
	mnt("sysfs", "/sys", "sysfs", nosuid_nodev_noexec, 0);
	mnt("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
	sys3(SYS_mkdir, "/dev/pts", 0755, 0);
	mnt("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620");
	mnt("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid_nodev_noexec, "nsdelegate");

	say("LTV-READY", 0);

	long fd = sys3(SYS_open, "/proc/cmdline", 0, 0);
	if (fd >= 0) {
		long n = sys3(SYS_read, fd, cmdline, sizeof(cmdline) - 1);
		sys3(SYS_close, fd, 0, 0);
		if (n > 0) {
			cmdline[n] = 0;
			for (char *p = cmdline; *p;) {
				while (*p == ' ' || *p == '\n')
					p++;
				char *w = p;
				while (*p && *p != ' ' && *p != '\n')
					p++;
				if (*p)
					*p++ = 0;
				if (prefix(w, "ltv.init="))
					mode = w + 9;
			}
		}
	}

	if (mode && ((prefix(mode, "poweroff") && !mode[8]) || (prefix(mode, "reboot") && !mode[6])))
		do_reboot(0x01234567);	/* LINUX_REBOOT_CMD_RESTART */
	if (mode && prefix(mode, "halt") && !mode[4])
		do_reboot(0x4321fedc);	/* LINUX_REBOOT_CMD_POWER_OFF */

	const char *path = (mode && *mode) ? mode : "/bin/sh";
	const char *argv[] = { path, 0 };
	const char *envp[] = { "PATH=/bin:/sbin:/usr/bin:/usr/sbin", "HOME=/root", "TERM=linux", 0 };
	long r = sys3(SYS_execve, path, argv, envp);
	(void)r;
	say("init: cannot exec ", path);
	do_reboot(0x01234567);
	for (;;)
		;
}

/* The kernel enters with the stack 16-byte aligned; keep it so for the call. */
__asm__(".text\n"
	".global _start\n"
	"_start:\n"
	"	xor %ebp, %ebp\n"
	"	and $-16, %rsp\n"
	"	call init_main\n"
	"	hlt\n");
