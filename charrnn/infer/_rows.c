/* Row products whose bits do not depend on how many rows there are.

   out[m][n] = init[m][n] + x[m][0] * w[0][n] + x[m][1] * w[1][n] + ... + x[m][K-1] * w[K-1][n]

   summed in k order, each product rounded to float before its add (no fused multiply-add:
   built with -ffp-contract=off). Every output is this one sequence of operations, whatever
   M is, whichever block of rows it falls in and whichever thread computes it; BLAS sgemm
   instead picks a kernel by M (on the CPUs measured: a matrix-vector path for 1-3 rows,
   blocked FMA kernels from 4), so a row's last bits depend on the batch. This is the same
   sequence the matrix-vector path computed on those CPUs, so a served row equals
   `charrnn sample`'s one-stream row there (charrnn/rows.py says how that is tested).

   Speed: the columns come in panels of PW = 64, pre-packed (N / PW, K, PW) so that a panel
   streams through the cache in order; each step of k loads one panel row and updates a
   block of 4 rows x 64 columns held in registers (16 AVX-512 or 32 AVX2 vectors, the
   latter spilling a little). Columns past the last full panel are summed one at a time
   from w itself, in the same order.

   Built by setup.py as the optional extension charrnn._rows; rows.py calls it through
   ctypes (which lets go of the GIL, so two threads can share the panels of one call). */

#include <Python.h>
#include <string.h>

#define RB 4          /* rows a block */
#define PW 64         /* columns a panel */

#if defined(__GNUC__)
#define VL 16
typedef float vf __attribute__((vector_size(VL * 4), aligned(4)));
#define CB (PW / VL)

static inline vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf start(const float *init, long offset) { return init ? load(init + offset) : (vf){0}; }

#if defined(__x86_64__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

CLONES static void panel_rows(const float *x, long xs, const float *panel, const float *init, long is,
                              float *out, long os, long M, long K, long n0)
{
    long m = 0;
    for (; m + RB <= M; m += RB) {
        vf acc[RB][CB];
        for (int r = 0; r < RB; r++)
            for (int c = 0; c < CB; c++) acc[r][c] = start(init, (m + r) * is + n0 + c * VL);
        for (long k = 0; k < K; k++) {
            vf wv[CB];
            for (int c = 0; c < CB; c++) wv[c] = load(panel + k * PW + c * VL);
            for (int r = 0; r < RB; r++) {
                vf xv = (vf){0} + x[(m + r) * xs + k];
                for (int c = 0; c < CB; c++) acc[r][c] = acc[r][c] + xv * wv[c];
            }
        }
        for (int r = 0; r < RB; r++)
            for (int c = 0; c < CB; c++) store(out + (m + r) * os + n0 + c * VL, acc[r][c]);
    }
    for (; m < M; m++) {
        vf acc[CB];
        for (int c = 0; c < CB; c++) acc[c] = start(init, m * is + n0 + c * VL);
        for (long k = 0; k < K; k++) {
            vf xv = (vf){0} + x[m * xs + k];
            for (int c = 0; c < CB; c++) acc[c] = acc[c] + xv * load(panel + k * PW + c * VL);
        }
        for (int c = 0; c < CB; c++) store(out + m * os + n0 + c * VL, acc[c]);
    }
}
#else
static void panel_rows(const float *x, long xs, const float *panel, const float *init, long is,
                       float *out, long os, long M, long K, long n0)
{
    for (long m = 0; m < M; m++)
        for (long j = 0; j < PW; j++) {
            float a = init ? init[m * is + n0 + j] : 0.0f;
            for (long k = 0; k < K; k++) a = a + x[m * xs + k] * panel[k * PW + j];
            out[m * os + n0 + j] = a;
        }
}
#endif

/* Panels p0 <= p < p1 of (M, K) x rows times the pre-packed w, and, if tail, the columns
   from the last full panel on, summed from w (K, N) with row stride ws. init may be NULL
   (zeros) or equal to out (accumulate in place). Strides are in floats. */
#if defined(_WIN32)
__declspec(dllexport)
#endif
void charrnn_rows(const float *x, long long xs, const float *panels, const float *w, long long ws,
                  const float *init, long long is, float *out, long long os,
                  long long M, long long K, long long N, long long p0, long long p1, int tail)
{
    for (long long p = p0; p < p1; p++)
        panel_rows(x, (long)xs, panels + p * K * PW, init, (long)is, out, (long)os, (long)M, (long)K, (long)(p * PW));
    if (!tail)
        return;
    for (long long n = (N / PW) * PW; n < N; n++)
        for (long long m = 0; m < M; m++) {
            float a = init ? init[m * is + n] : 0.0f;
            for (long long k = 0; k < K; k++) a = a + x[m * xs + k] * w[k * ws + n];
            out[m * os + n] = a;
        }
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rows",
                                    "Batch-invariant row products (called through ctypes: charrnn/rows.py).", -1, NULL};

PyMODINIT_FUNC PyInit__rows(void) { return PyModule_Create(&module); }
