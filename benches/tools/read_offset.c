/*
 * read_offset: does the kernel copy a TCP read into user memory more slowly at some
 * destination offsets? One loopback connection; a writer thread sends 16 KiB writes, the
 * reader reads up to 16 KiB at a time into a 4 KiB-aligned buffer + OFFSET, and prints its
 * own CPU time per KiB read. echo-server reads after the unfinished frame it keeps (a varying
 * offset); the raw-buf baseline always at offset 0.
 *
 *   gcc -O2 -pthread read_offset.c -o read_offset
 *   for o in 0 4 8 16 32 64 1009; do ./read_offset $o 512; done   # OFFSET, MiB to read
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <pthread.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <sys/socket.h>
#include <time.h>
#include <sys/resource.h>
static long total = 4L<<30; static int wfd;
static void* writer(void*a){ char *b=aligned_alloc(64,65536); memset(b,'x',65536); long left=total; while(left>0){ long n=write(wfd,b,left<16384?left:16384); if(n<=0)break; left-=n;} return 0;}
static double tcpu(){ struct timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID,&t); return t.tv_sec+t.tv_nsec/1e9;}
int main(int argc,char**argv){ int off=atoi(argv[1]); if(argc>2) total=atol(argv[2])<<20;
 int l=socket(AF_INET,SOCK_STREAM,0); struct sockaddr_in a={.sin_family=AF_INET,.sin_addr.s_addr=htonl(0x7f000001)}; bind(l,(void*)&a,sizeof a); listen(l,1); socklen_t al=sizeof a; getsockname(l,(void*)&a,&al);
 wfd=socket(AF_INET,SOCK_STREAM,0); connect(wfd,(void*)&a,sizeof a); int r=accept(l,0,0);
 pthread_t t; pthread_create(&t,0,writer,0);
 char*buf=aligned_alloc(4096,65536+4096); long got=0,reads=0; double c0=tcpu();
 while(got<total){ long n=read(r,buf+off,16384); if(n<=0)break; got+=n; reads++; }
 double c1=tcpu(); pthread_join(t,0);
 printf("off=%5d reads=%ld avg=%.0f B  reader cpu %.1f ns/KiB\n",off,reads,(double)got/reads,(c1-c0)*1e9/(got/1024.0));}
