/*
 * Lightervisor guest /init (PID 1): freestanding, no libc.
 *
 * It is the init of every microVM the daemon boots (api/build.rs compiles it into
 * ltv, which writes it to the root disk) and of the VMM's boot tests (initramfs.sh).
 * On kvm-pvm hosts every fork costs about a second and every system call is a page
 * fault plus emulated kernel code, so this does the minimum with direct system calls:
 *
 *   mount proc on /proc, sysfs on /sys, devtmpfs on /dev, devpts on /dev/pts,
 *   cgroup2 on /sys/fs/cgroup (pure cgroup v2, nsdelegate), tmpfs on /run;
 *   make /dev/console its stdio; set the hostname from `ltv.hostname=`;
 *   print "LTV-READY" on the console;
 *   if /.ltv/ltv exists, start `ltv agent` (its own session, nice -10 until it serves,
 *   log in /var/log/ltv-agent.log, LTV_LOG from `ltv.log=`, default warn);
 *   then act on `ltv.init=` from /proc/cmdline:
 *     ltv.init=poweroff -> end the VM: reboot(RESTART).  A microVM has no power-off
 *                          device (no ACPI), so the kernel's power-off only halts;
 *                          a reset is how a guest ends (as in Firecracker): with
 *                          reboot=k the kernel writes 0xFE to port 0x64 and the VMM
 *                          (or QEMU -no-reboot with an i8042) exits.
 *     ltv.init=reboot   -> the same
 *     ltv.init=halt     -> reboot(POWER_OFF): the kernel halts, the VMM keeps running
 *     ltv.init=none     -> stay PID 1: reap orphans; on SIGUSR2 (busybox's convention,
 *                          which the agent uses), SIGTERM or SIGINT stop everything
 *                          and power off
 *     ltv.init=/path    -> execve(/path)
 *     (absent)          -> execve(/bin/sh)    (busybox ash on the console)
 *   If the exec fails it says so and restarts the VM (PID 1 must not exit).
 *
 * With `ltv_pvm_compat` on the command line every process gets PVM_GLIBC_TUNABLES
 * (api/src/daemon/pvm-glibc-tunables, passed in by the build): see agent.rs.
 *
 * Build: gcc -Os -static -nostdlib -ffreestanding -fno-stack-protector -fno-pie -no-pie -s
 */
typedef unsigned long u64;

#define SYS_read 0
#define SYS_write 1
#define SYS_open 2
#define SYS_close 3
#define SYS_rt_sigprocmask 14
#define SYS_access 21
#define SYS_dup2 33
#define SYS_nanosleep 35
#define SYS_fork 57
#define SYS_execve 59
#define SYS_exit 60
#define SYS_wait4 61
#define SYS_kill 62
#define SYS_mkdir 83
#define SYS_setsid 112
#define SYS_rt_sigtimedwait 128
#define SYS_setpriority 141
#define SYS_sync 162
#define SYS_mount 165
#define SYS_reboot 169
#define SYS_sethostname 170

#define MS_NOSUID 2
#define MS_NODEV 4
#define MS_NOEXEC 8

#define O_WRONLY 01
#define O_RDWR 02
#define O_CREAT 0100
#define O_NOCTTY 0400
#define O_APPEND 02000

#define SIGINT 2
#define SIGKILL 9
#define SIGUSR2 12
#define SIGTERM 15
#define SIGCHLD 17

#define REBOOT_RESTART 0x01234567
#define REBOOT_POWER_OFF 0x4321fedc

/* The agent's path: bundle.rs GUEST_LTV. */
#define AGENT "/.ltv/ltv"
/* Where the agent starts: agent.rs STARTUP_NICE. */
#define AGENT_NICE (-10)

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
#define sys4(n, a, b, c, d) sys6(n, (long)(a), (long)(b), (long)(c), (long)(d), 0, 0)

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
	if (r < 0 && r != -16 /* EBUSY: already mounted */)
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

static int is(const char *s, const char *word)
{
	return prefix(s, word) && !s[len(word)];
}

/* `a` then `b` into `buf` (of `size`), NUL-terminated, cut to fit. */
static char *join(char *buf, u64 size, const char *a, const char *b)
{
	u64 n = 0;
	for (const char *s = a; *s && n + 1 < size; s++)
		buf[n++] = *s;
	for (const char *s = b; *s && n + 1 < size; s++)
		buf[n++] = *s;
	buf[n] = 0;
	return buf;
}

static char cmdline[4096];
static char log_env[128];
static const char *envp[6];

static void set_env(int pvm, const char *log)
{
	int i = 0;
	envp[i++] = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
	envp[i++] = "HOME=/root";
	envp[i++] = "TERM=linux";
#ifdef PVM_GLIBC_TUNABLES
	if (pvm)
		envp[i++] = PVM_GLIBC_TUNABLES;
#endif
	(void)pvm;
	/* Last: the image's init gets the same environment without it. */
	envp[i++] = join(log_env, sizeof(log_env), "LTV_LOG=", log ? log : "warn");
	envp[i] = 0;
}

static void start_agent(void)
{
	const char *argv[] = { AGENT, "agent", 0 };
	long pid = sys3(SYS_fork, 0, 0, 0);
	if (pid < 0) {
		say("init: cannot start the agent", 0);
		return;
	}
	if (pid > 0)
		return;
	sys3(SYS_setsid, 0, 0, 0);
	/* Ahead of the image's init, whose boot scripts fork on the same vCPU; the agent
	 * drops back to nice 0 once it serves. */
	sys3(SYS_setpriority, 0 /* PRIO_PROCESS */, 0, AGENT_NICE);
	long fd = sys3(SYS_open, "/var/log/ltv-agent.log", O_WRONLY | O_CREAT | O_APPEND, 0644);
	if (fd >= 0) {
		sys3(SYS_dup2, fd, 1, 0);
		sys3(SYS_dup2, fd, 2, 0);
	}
	sys3(SYS_execve, AGENT, argv, envp);
	sys3(SYS_exit, 127, 0, 0);
}

/* PID 1 without an init to hand over to. */
static void __attribute__((noreturn)) stay_init(void)
{
	u64 set = (1UL << (SIGCHLD - 1)) | (1UL << (SIGUSR2 - 1)) | (1UL << (SIGTERM - 1)) |
		  (1UL << (SIGINT - 1));
	sys4(SYS_rt_sigprocmask, 0 /* SIG_BLOCK */, &set, 0, 8);
	for (;;) {
		while (sys4(SYS_wait4, -1, 0, 1 /* WNOHANG */, 0) > 0)
			;
		long sig = sys4(SYS_rt_sigtimedwait, &set, 0, 0, 8);
		if (sig < 0 || sig == SIGCHLD)
			continue;
		say("init: powering off", 0);
		sys3(SYS_kill, -1, SIGTERM, 0);
		/* Up to 3 s for everything to exit; wait4 fails once no child is left. */
		struct { long s, ns; } tick = { 0, 50000000 };
		for (int i = 0; i < 60 && sys4(SYS_wait4, -1, 0, 1, 0) >= 0; i++)
			sys3(SYS_nanosleep, &tick, 0, 0);
		sys3(SYS_kill, -1, SIGKILL, 0);
		sys3(SYS_sync, 0, 0, 0);
		do_reboot(REBOOT_POWER_OFF);
	}
}

void __attribute__((noreturn, used)) init_main(void)
{
	const long nosuid_nodev_noexec = MS_NOSUID | MS_NODEV | MS_NOEXEC;
	const char *mode = 0, *hostname = 0, *log = 0;
	int pvm = 0;

	mnt("proc", "/proc", "proc", nosuid_nodev_noexec, 0);
	mnt("sysfs", "/sys", "sysfs", nosuid_nodev_noexec, 0);
	mnt("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
	/* The kernel opened the root's /dev/console, if it had one: use devtmpfs's. */
	long con = sys3(SYS_open, "/dev/console", O_RDWR | O_NOCTTY, 0);
	if (con >= 0) {
		for (long fd = 0; fd < 3; fd++)
			sys3(SYS_dup2, con, fd, 0);
		if (con > 2)
			sys3(SYS_close, con, 0, 0);
	}
	sys3(SYS_mkdir, "/dev/pts", 0755, 0);
	mnt("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620");
	mnt("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid_nodev_noexec, "nsdelegate");
	sys3(SYS_mkdir, "/run", 0755, 0);
	mnt("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");

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
				else if (prefix(w, "ltv.hostname="))
					hostname = w + 13;
				else if (prefix(w, "ltv.log="))
					log = w + 8;
				else if (is(w, "ltv_pvm_compat"))
					pvm = 1;
			}
		}
	}
	if (hostname)
		sys3(SYS_sethostname, hostname, len(hostname), 0);
	set_env(pvm, log);

	say("LTV-READY", 0);

	if (mode && (is(mode, "poweroff") || is(mode, "reboot")))
		do_reboot(REBOOT_RESTART);
	if (mode && is(mode, "halt"))
		do_reboot(REBOOT_POWER_OFF);

	if (sys3(SYS_access, AGENT, 1 /* X_OK */, 0) == 0)
		start_agent();
	if (mode && is(mode, "none"))
		stay_init();

	const char *path = (mode && *mode) ? mode : "/bin/sh";
	const char *argv[] = { path, 0 };
	/* LTV_LOG is the agent's alone. */
	for (int i = 0; envp[i]; i++)
		if (prefix(envp[i], "LTV_LOG="))
			envp[i] = 0;
	sys3(SYS_execve, path, argv, envp);
	say("init: cannot exec ", path);
	do_reboot(REBOOT_RESTART);
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
