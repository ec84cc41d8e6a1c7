/*
 * malloc_free: the cost of one malloc(64) + free pair, for `cargo xtask bench`.
 *
 * Usage: malloc_free [PAIRS]      (default 2,000,000 pairs)
 *
 * Prints one line, ns_per_pair=<float>. Only the measured loop is timed (CLOCK_MONOTONIC),
 * not process start-up or the warm-up, so under `tracer record` the figure is the per-call
 * cost of tracing, not the tracer's start-up.
 *
 * Build: cc -O2 -fno-omit-frame-pointer -o malloc_free malloc_free.c
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define DEFAULT_PAIRS 2000000UL
#define WARMUP_PAIRS 10000UL
#define BLOCK_SIZE 64

/* Each block is written and stored here, so the compiler cannot drop the malloc+free pair. */
static void *volatile sink;

__attribute__((noinline)) static void malloc_free_pairs(unsigned long pairs)
{
	for (unsigned long i = 0; i < pairs; i++) {
		char *block = malloc(BLOCK_SIZE);
		if (!block) {
			perror("malloc");
			exit(1);
		}
		block[0] = (char)i;
		sink = block;
		free(block);
	}
}

static double now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

int main(int argc, char **argv)
{
	unsigned long pairs = DEFAULT_PAIRS;
	if (argc > 2) {
		fprintf(stderr, "usage: %s [PAIRS]\n", argv[0]);
		return 2;
	}
	if (argc == 2) {
		char *end;
		errno = 0;
		pairs = strtoul(argv[1], &end, 10);
		if (errno != 0 || *end != '\0' || end == argv[1] || pairs == 0) {
			fprintf(stderr, "%s: PAIRS must be a positive integer, got '%s'\n", argv[0],
				argv[1]);
			return 2;
		}
	}

	malloc_free_pairs(WARMUP_PAIRS);

	double start = now_ns();
	malloc_free_pairs(pairs);
	double elapsed = now_ns() - start;

	printf("ns_per_pair=%.3f\n", elapsed / (double)pairs);
	return 0;
}
