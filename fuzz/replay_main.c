/*
 * replay: a harness without libFuzzer. Linked with one fuzz_*.c, it calls
 * LLVMFuzzerTestOneInput once per file, so the ordinary test build (gcc,
 * ASan/UBSan) re-runs the seed corpus and every saved crash on each run.
 *
 *   replay_<harness> PATH...   files, or directories (their files, sorted)
 *
 * Exits 0 when every input ran (a failed property aborts), 1 on a missing
 * path or when there was no input at all, a sign of a wrong path.
 */
#include "fuzz.h"

#include <dirent.h>
#include <errno.h>
#include <sys/stat.h>

/* Defined by the harnesses that need set-up; libFuzzer calls it once. */
int LLVMFuzzerInitialize(int *argc, char ***argv) __attribute__((weak));

/* read_file returns the contents, malloc'd (an empty file gives an empty
 * input, not NULL), or NULL with errno set. */
static uint8_t *read_file(const char *path, size_t *size)
{
    FILE *f = fopen(path, "rb");
    uint8_t *buf = NULL;
    struct stat st;

    if (!f)
        return NULL;
    if (fstat(fileno(f), &st) == 0 && (buf = malloc((size_t)st.st_size + 1))) {
        *size = fread(buf, 1, (size_t)st.st_size, f);
        if (ferror(f)) {
            free(buf);
            buf = NULL;
        }
    }
    fclose(f);
    return buf;
}

static int replay_file(const char *path)
{
    size_t size;
    uint8_t *data = read_file(path, &size);

    if (!data) {
        dprintf(2, "replay: cannot read %s: %s\n", path, strerror(errno));
        return -1;
    }
    /* Named before it runs: if it crashes, the log says which input. */
    dprintf(2, "replay: %s (%zu bytes)\n", path, size);
    LLVMFuzzerTestOneInput(data, size);
    free(data);
    return 1;
}

static int skip_hidden(const struct dirent *d)
{
    return d->d_name[0] != '.';
}

/* replay_dir returns the number of inputs replayed, or -1. */
static int replay_dir(const char *dir)
{
    struct dirent **names;
    int n = scandir(dir, &names, skip_hidden, alphasort), count = 0;

    if (n < 0) {
        dprintf(2, "replay: cannot read directory %s: %s\n", dir,
                strerror(errno));
        return -1;
    }
    for (int i = 0; i < n; i++) {
        char path[4096];
        struct stat st;

        snprintf(path, sizeof path, "%s/%s", dir, names[i]->d_name);
        if (stat(path, &st) == 0 && S_ISREG(st.st_mode)) {
            int r = replay_file(path);
            count = r < 0 || count < 0 ? -1 : count + r;
        }
        free(names[i]);
    }
    free(names);
    return count;
}

int main(int argc, char **argv)
{
    struct stat st;
    int total = 0, failed = 0;

    if (LLVMFuzzerInitialize)
        LLVMFuzzerInitialize(&argc, &argv);
    for (int i = 1; i < argc; i++) {
        int r = stat(argv[i], &st) == 0 && S_ISDIR(st.st_mode)
                    ? replay_dir(argv[i])
                    : replay_file(argv[i]);
        if (r < 0)
            failed = 1;
        else
            total += r;
    }
    dprintf(2, "replay: %d inputs\n", total);
    return failed || total == 0;
}
