/* bench/cg_fixed_seed.c - LD_PRELOAD shim for bench/run's callgrind section ONLY.
 *
 * LuaJIT seeds its PRNG from syscall(SYS_getrandom) when a Lua state is created; the PRNG
 * randomises the allocator's mmap hints, string hashing and machine-code placement.  Under
 * callgrind that made the instruction count of the very same config vary by several hundred
 * instructions per request between runs (different hash-table layouts -> different JIT traces).
 * This shim answers getrandom() made through syscall() with fixed bytes, so every run of a
 * config is the same program; all other system calls are passed through unchanged.
 *
 * Never use it outside a benchmark: it removes LuaJIT's hash-flooding protection.
 * Built by bench/run into its temporary directory:  cc -shared -fPIC -O2 -o X.so this.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdarg.h>
#include <stddef.h>
#include <sys/syscall.h>

long syscall(long number, ...)
{
    static long (*real)(long, ...);
    va_list ap;
    long a[6];
    int i;

    va_start(ap, number);
    for (i = 0; i < 6; i++)
        a[i] = va_arg(ap, long);   /* what glibc's syscall() does too: up to 6 register args */
    va_end(ap);
#ifdef SYS_getrandom
    if (number == SYS_getrandom) {
        unsigned char *p = (unsigned char *)a[0];
        size_t len = (size_t)a[1], k;
        for (k = 0; k < len; k++)
            p[k] = (unsigned char)(k * 37u + 11u);   /* never all-zero (xoshiro state) */
        return (long)len;
    }
#endif
    if (!real)
        real = (long (*)(long, ...))dlsym(RTLD_NEXT, "syscall");
    return real(number, a[0], a[1], a[2], a[3], a[4], a[5]);
}
